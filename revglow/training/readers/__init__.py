"""The readers of the data sets `revglow train` knows, one module per format (see revglow.training.data, whose
READERS table maps each data set's name to its reader)."""
