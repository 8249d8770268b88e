"""Sequence parallelism for dilated attention (LongNet paper, section 3.1).

Installed as ``longnet.distributed``. Every torch.distributed call of the project lives here,
so that ``longnet`` itself stays a set of pure PyTorch modules.
"""
