"""Drop-in masked versions of torch.optim.SGD, Adam and AdamW."""

from .adam import MaskedAdam, MaskedAdamW
from .sgd import MaskedSGD

__all__ = ["MaskedSGD", "MaskedAdam", "MaskedAdamW"]
