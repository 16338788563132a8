"""nmtkit: recurrent sequence-to-sequence models with attention (Bahdanau et al. 2015, Luong et al. 2015)."""

__version__ = "0.1.0"
