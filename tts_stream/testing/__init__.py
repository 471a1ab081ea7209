"""Tools for testing code built on tts-stream without a cloud account or a sound card.

The project's own tests and benchmarks use them; so can an application's tests, next to
:class:`tts_stream.server.LocalServer`. Not imported by ``tts_stream`` itself; the modules
need the ``server`` extra (espeak speech) and, for the devices, PulseAudio/ALSA utilities.

* :mod:`~tts_stream.testing.samplegen`: real espeak speech and clone samples, one that passes
  every rule and one breaking each rule (WAV/MP3/M4A bytes, deterministic, cached).
* :mod:`~tts_stream.testing.audio_env`: audio devices without hardware (an ALSA file device,
  a private PulseAudio null sink that can also feed a recorder).
* :mod:`~tts_stream.testing.enroll`: a voice on a local server by one plain HTTP POST.
* :mod:`~tts_stream.testing.hostile`: hostile samples and raw HTTP requests for abuse tests.
* :mod:`~tts_stream.testing.voice_encoder` and :mod:`~tts_stream.testing.speakers`: a
  torch-free speaker-similarity measure and the distinct sample speakers it is measured on.
"""
