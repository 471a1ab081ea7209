"""``python -m tts_stream`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
