"""Delta format, codecs and the compress / inspect / merge pipeline."""
