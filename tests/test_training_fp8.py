"""QLoRA-style training: `quantize: fp8` trains the adapter over a frozen fp8 base."""
import pytest
import torch

from slideredit.quantization import FP8, Fp8Linear
from slideredit.sliders import GSTLORA, STLORA, SliderLinear
from slideredit.training import TrainConfig
from slideredit.training.config import ConfigError
from slideredit.training.loop import Trainer
from test_train_script import faces, make_config, short_model_dir  # noqa: F401 (fixtures)
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_one_step_trains_the_adapter_and_leaves_the_fp8_weights_alone(short_model_dir, faces, tmp_path, method):
    trainer = Trainer(make_config(short_model_dir, tmp_path / "out", faces, method=method, quantize="fp8",
                                  max_train_steps=1))
    model = trainer.model
    fp8 = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype == FP8}
    adapted = [m for m in model.modules() if isinstance(m, SliderLinear)]
    assert fp8 and adapted and all(m.weight.dtype == FP8 for m in adapted)
    assert any(isinstance(m, Fp8Linear) for m in model.modules())  # quantized layers without an adapter too
    before = [p.detach().clone() for p in trainer.params]
    seen = {}

    def keep_gradients(optimizer, args, kwargs):  # the step's gradients, before zero_grad clears them
        seen.update({id(p): p.grad.clone() for p in trainer.params if p.grad is not None})

    hook = trainer.optimizer.register_step_pre_hook(keep_gradients)
    loss = trainer.train_step()
    hook.remove()

    assert torch.isfinite(loss) and loss > 0
    assert len(seen) == len(trainer.params)  # every adapter parameter got a gradient
    assert any(g.abs().max() > 0 for g in seen.values())
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before))  # the optimizer moved the adapter
    assert all(not p.requires_grad and p.grad is None for name, p in model.named_parameters() if p.dtype == FP8)
    after = dict(model.named_parameters())
    for name, value in fp8.items():
        assert torch.equal(after[name].view(torch.uint8), value.view(torch.uint8)), name


def test_quantize_value_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="quantize must be 'fp8' or null"):
        TrainConfig(images_dataset_path=str(tmp_path), training_single_edit_prompts=["add a hat"], quantize="int4")
    assert TrainConfig(images_dataset_path=str(tmp_path), training_single_edit_prompts=["add a hat"]).quantize is None
