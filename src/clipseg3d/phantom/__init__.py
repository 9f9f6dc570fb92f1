"""CT phantoms: synthetic bodies with organs and lesions, written as labelled datasets."""
