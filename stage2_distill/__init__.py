"""Stage 2 of TSD-KD: distil the cached teacher signal into the student (see METHOD.md)."""
