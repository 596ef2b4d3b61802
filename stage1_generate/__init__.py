"""Stage 1: sample student candidates, score them with the teacher, write the signal dataset."""
