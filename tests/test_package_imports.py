"""The import name `kernels` is this project's package, and transformers' text encoders still import
beside it. transformers 5.25 started requiring Hugging Face's own `kernels` package, whose import name
collides with kernels/ here (hence the pin transformers<5.25 in requirements.txt): from the repository
root that release failed to import its model classes."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_kernels_is_this_projects_package():
    import kernels

    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert callable(kernels.masked_lora_linear)


def test_transformers_text_encoders_import_and_run_from_the_repo_root():
    """A fresh interpreter in the repository root (where `kernels` is ours): import the model classes
    the pipeline uses, build tiny ones and run them."""
    code = """
import kernels, torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
assert hasattr(kernels, "masked_lora_linear"), kernels.__file__
t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
clip = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8))
ids = torch.tensor([[1, 2, 3]])
print(tuple(t5(ids).last_hidden_state.shape), tuple(clip(ids).pooler_output.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["(1,", "3,", "8)", "(1,", "8)"]
