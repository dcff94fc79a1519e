"""The trainer service: a domain specialist trained from a team\x27s own labelled batches."""
