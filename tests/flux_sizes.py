"""The FluxParams and AutoEncoderParams sizes the model tests build: small enough for the CPU, each exercising
every path of the model."""
from slideredit.autoencoder import AutoEncoderParams
from slideredit.transformer import FluxParams

# One double and two single blocks of width 64: the smallest model that exercises every path.
TINY_FLUX = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2,
                       axes_dim=(4, 14, 14))

# A second size: more blocks and heads, a RoPE split other than FLUX's rule.
SMALL_FLUX = FluxParams(vec_in_dim=48, context_in_dim=40, hidden_size=96, num_heads=3, depth=2,
                        depth_single_blocks=3, axes_dim=(8, 12, 12))

# The autoencoder at four levels of 32 channels (GroupNorm's 32 groups need multiples of 32).
TINY_AUTOENCODER = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1))
