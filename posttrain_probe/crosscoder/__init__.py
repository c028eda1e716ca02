"""N-model sparse crosscoders (SPEC sec. 3): the model, its config and its training loop."""

from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder, CrosscoderOutput
from posttrain_probe.crosscoder.train import CrosscoderTrainingConfig, train_crosscoder

__all__ = ["Crosscoder", "CrosscoderConfig", "CrosscoderOutput", "CrosscoderTrainingConfig", "train_crosscoder"]
