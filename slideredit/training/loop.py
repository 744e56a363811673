"""The training loop: GSTLoRA / STLoRA self-distillation on FLUX.1 Kontext, one process or many.

One optimizer step draws the global batch of G = train_batch_size x world_size x
gradient_accumulation_steps samples, numbered continuously over the run. Micro-step m of rank r takes
samples [(m * world_size + r) * b, ... + b) of it (b = train_batch_size). A sample's image, prompts,
noise level and noise are functions of (seed, sample number) only (data.py), so one process with
batch G and W processes with batch G / W train on exactly the same samples, and a resumed run needs
only the step and the number of samples drawn.

Per micro-step: the VAE and the text encoders run once (frozen, no_grad; the student's and the
teacher's prompts in one call), then the teacher pass (no_grad) and the student pass with its backward.
The loop never waits for the GPU except every `logging_steps` steps (loss and NaN check) and when it
writes a checkpoint. Several processes hold the model whole (DDP) or sharded (FSDP): distributed.py.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..grids import save_png
from ..image import load_image, to_rgb
from ..pipelines import SliderEditFluxKontextPipeline
from ..slider_checkpoints import load_adapter, save_adapter
from ..sliders import STLORA, adapter_parameters, init_adapter
from ..sampling import latent_ids, text_ids
from .checkpoints import (checkpoints, global_rng_state, load_training_state, prune_checkpoints, resolve_resume,
                          save_checkpoint, set_global_rng_state)
from .config import FSDP, ConfigError, TrainConfig
from .data import DataError, DataOrder, UnreadableImage, center_crop, decode_image, derived_seed, open_dataset, to_pixels
from .distributed import (Distributed, cleanup_distributed, full_optimizer_state, full_tensor, gradient_sync,
                          local_parameter_bytes, setup_distributed, shard_model, shard_optimizer_state)
from .encoding import EncodingCache, FrozenEncoders, Source
from .losses import (DistillationBatch, DistillationPrompts, distillation_prompts, draw_sigmas, draw_suppressed,
                     self_distillation_loss, stlora_token_scales)
from .outputs import check_output_dir, clear_output_dir
from .validation import validation_grid

logger = logging.getLogger("slideredit.training")
NO_BAD_STEP = 2 ** 62  # "no non-finite loss yet" in the on-device first-bad-step tracker
LATENT_CHANNELS = 64  # packed: 16 latent channels x 2 x 2


class TrainingDiverged(FloatingPointError):
    """The loss or the adapter became NaN or infinite; nothing was saved after it."""


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    loss: float | None  # the mean loss of the last logging interval
    unreadable_images: int  # skipped, over all processes


@dataclass
class Sample:
    source: Source  # its dataset item, or the next readable one if that is unreadable
    prompts: DistillationPrompts
    sigma: torch.Tensor  # (1,)
    noise: torch.Tensor  # (N, 64) fp32


class Trainer:
    """`overwrite`: the earlier run in output_dir is about to be removed, so `resume_from_checkpoint:
    latest` starts afresh instead of resuming it."""

    def __init__(self, config: TrainConfig, dist: Distributed | None = None, overwrite: bool = False):
        self.config = c = config
        self.overwrite = overwrite
        self.dist = d = dist or Distributed()
        self.device = d.device
        self.tracker = start_wandb(c) if c.report_to == "wandb" and d.is_main else None
        dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
        self.sharded = c.sharding == FSDP and d.enabled
        # FSDP loads on the CPU (memory-mapped where the file needs no conversion) and moves only this
        # process's shards to the device: the whole transformer never sits on one GPU.
        load_device = torch.device("cpu") if self.sharded else self.device
        with d.main_process_first():  # hub downloads happen once, on rank 0
            self.dataset = open_dataset(c)
            check_validation_image(c)  # before the model loads, not at the first validation step
            self.pipe = SliderEditFluxKontextPipeline.from_pretrained(
                c.pretrained_model_name_or_path, torch_dtype=dtype, device=load_device, offload=c.offload,
                quantize=c.quantize)
        self.model = self.pipe.transformer
        self.model.gradient_checkpointing = c.gradient_checkpointing
        cache = EncodingCache(c.cache_dir, model_key=model_key(c.pretrained_model_name_or_path)) if c.cache_dir else None
        self.encoders = FrozenEncoders(self.pipe, c.resolution, cache, c.offload)
        self.order = DataOrder(len(self.dataset), c.seed)
        self.global_batch = c.train_batch_size * d.world_size * c.gradient_accumulation_steps
        self.tokens = (c.resolution // 16) ** 2  # noisy tokens N; the context adds N more
        side = c.resolution // 16
        self.img_ids = torch.cat([latent_ids(1, side, side, first_id=0), latent_ids(1, side, side, first_id=1)],
                                 dim=1).to(self.device, dtype)  # (1, 2N, 3), built once for the run
        self.txt_ids = text_ids(1, self.encoders.max_length, self.device, dtype)
        self.step, self.samples, self.unreadable = 0, 0, set()
        self._validation_image: Image.Image | None = None
        self.student: nn.Module = self.model  # the module the student pass runs through (distribute())
        self.params, self.optimizer = self.start_or_resume()

    # --- setup ----------------------------------------------------------------------------------------

    def start_or_resume(self) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        """A fresh adapter and optimizer, or both (and the step, data position, RNGs) from a checkpoint.
        In between, the model with its adapter is spread over the processes (distribute): under FSDP the
        optimizer then holds this process's shards, and a checkpoint's whole moments are split to match."""
        c = self.config
        random.seed(c.seed)
        np.random.seed(c.seed)
        torch.manual_seed(c.seed)
        latest_of_removed_run = self.overwrite and c.resume_from_checkpoint == "latest"
        resume = None if latest_of_removed_run else resolve_resume(c.output_dir, c.resume_from_checkpoint)
        check_same_checkpoint(resume, c, self.dist)
        self.resumed_from = resume
        state = load_training_state(resume) if resume is not None else None
        if state is not None:
            check_resumable(state, c, resume)
            load_adapter(self.model, c.method, resume, lora_rank=c.lora_rank)
        else:
            init_adapter(self.model, c.method, c.lora_rank,
                         generator=torch.Generator().manual_seed(derived_seed(c.seed, "adapter")))
        for p in adapter_parameters(self.model, c.method).values():
            p.requires_grad_(True)  # fp32, whatever the model's dtype
        self.student = self.distribute()
        params = list(adapter_parameters(self.model, c.method).values())  # after FSDP: the shards
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                      weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        if state is not None:
            optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], params))
            self.step, self.samples = state["step"], state["samples"]  # the data position: samples drawn
            self.unreadable = set(state["unreadable"].tolist())
            set_global_rng_state(state["rng"])
        return params, optimizer

    def distribute(self) -> nn.Module:
        """Spread the model, its adapter attached, over the processes; -> the module the student pass runs
        through (the model itself, or its DistributedDataParallel wrapper)."""
        d = self.dist
        if not d.enabled:
            return self.model
        if self.sharded:
            shard_model(self.model, self.device)
            self.pipe.to(self.device)  # the VAE and text encoders, loaded on the CPU beside the transformer
            return self.model
        # Every rank built the same model from the same files and seed: skip DDP's initial broadcast,
        # which would send all 12 B frozen parameters. Only the adapter (requires_grad) is reduced.
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, init_sync=False)

    def log_start(self) -> None:
        c, d = self.config, self.dist
        held = d.gather(local_parameter_bytes(self.model))  # every process takes part
        whole = sum(p.numel() * p.element_size() for p in self.model.parameters())  # DTensors: the whole shape
        how = "FSDP shards" if self.sharded else "the whole model"
        per_rank = ", ".join(f"rank {r} {n} bytes ({n / 1e9:.3g} GB)" for r, n in enumerate(held))
        logger.info("parameters held per process (%s): %s; the model's parameters: %d bytes (%.3g GB)", how,
                    per_rank, whole, whole / 1e9)
        if self.resumed_from is None:
            if c.resume_from_checkpoint == "latest":
                logger.info("no checkpoint in %s yet: starting from scratch", c.output_dir)
            return
        logger.info("resumed from %s at step %d", self.resumed_from, self.step)
        later = [str(path) for step, path in checkpoints(c.output_dir) if step > self.step]
        if later:
            logger.warning("%s are of later steps than the checkpoint resumed from: each is replaced when this run "
                           "reaches its step", ", ".join(later))

    # --- data -----------------------------------------------------------------------------------------

    def source(self, index: int) -> Source:
        """A cached latent, or the decoded, centre-cropped pixels (raises UnreadableImage)."""
        raw = self.dataset.raw_image(index)
        key = self.encoders.image_key(raw)
        latent = self.encoders.cached_latent(key)
        if latent is not None:
            return Source(key, latent=latent)
        return Source(key, pixels=to_pixels(center_crop(decode_image(raw), self.config.resolution)))

    def readable_source(self, index: int) -> tuple[int, Source]:
        """The item at `index` or, if unreadable, the next readable one (a deterministic choice, so the
        run stays reproducible); unreadable items are warned about once and counted."""
        n = len(self.dataset)
        for offset in range(n):
            i = (index + offset) % n
            if i in self.unreadable:
                continue
            try:
                return i, self.source(i)
            except UnreadableImage as err:
                self.unreadable.add(i)
                logger.warning("skipping unreadable image %s: %s (%d skipped so far)", self.dataset.describe(i),
                               err, len(self.unreadable))
        raise DataError(f"every one of the {n} images of the dataset is unreadable (see the warnings above): "
                        "nothing to train on")

    def sample(self, number: int) -> Sample:
        """Sample `number` of the run: image, instructions, suppressed subset, sigma and noise, all drawn
        from generators seeded by (seed, number)."""
        c = self.config
        index, source = self.readable_source(self.order.index(number))
        rng = random.Random(derived_seed(c.seed, "prompt", number))
        instructions = self.dataset.instructions(index, rng)
        suppressed = draw_suppressed(len(instructions), rng) if c.method == STLORA else ()
        generator = torch.Generator(self.device).manual_seed(derived_seed(c.seed, "noise", number))
        sigma = draw_sigmas(1, generator)
        noise = torch.randn(self.tokens, LATENT_CHANNELS, generator=generator, device=self.device)
        return Sample(source, distillation_prompts(c.method, instructions, suppressed, c.teacher_prompt),
                      sigma, noise)

    def micro_batch(self, first: int, size: int) -> DistillationBatch:
        """Samples first .. first + size - 1, encoded: the frozen encoders' one run for this micro-step."""
        c = self.config
        samples = [self.sample(n) for n in range(first, first + size)]
        prompts = [s.prompts for s in samples]
        txt, vec = self.encoders.prompts([p.student for p in prompts] + [p.teacher for p in prompts])
        if c.method == STLORA:
            scale = stlora_token_scales(prompts, self.encoders.t5_token_ids, self.encoders.max_length).to(self.device)
        else:
            scale = 1.0
        return DistillationBatch(
            x=self.encoders.latents([s.source for s in samples]), noise=torch.stack([s.noise for s in samples]),
            sigma=torch.cat([s.sigma for s in samples]), img_ids=self.img_ids.expand(size, -1, -1),
            txt_ids=self.txt_ids.expand(size, -1, -1),
            guidance=torch.full((size,), c.guidance_scale, device=self.device, dtype=self.pipe.dtype),
            student_txt=txt[:size], student_vec=vec[:size], teacher_txt=txt[size:], teacher_vec=vec[size:],
            student_scale=scale)

    # --- one optimizer step ---------------------------------------------------------------------------

    def micro_loss(self, batch: DistillationBatch) -> torch.Tensor:
        return self_distillation_loss(self.model, self.config.method, batch, student=self.student)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch; -> this rank's mean loss (a device tensor, no sync)."""
        c, d = self.config, self.dist
        b, accumulation = c.train_batch_size, c.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for m in range(accumulation):
            batch = self.micro_batch(self.samples + (m * d.world_size + d.rank) * b, b)
            # Reduce the adapter's gradients across processes only on the last micro-step.
            with gradient_sync(self.student, enabled=m == accumulation - 1):
                loss = self.micro_loss(batch)
                (loss / accumulation).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += self.global_batch
        return total / accumulation

    # --- the run --------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        c, d = self.config, self.dist
        out = Path(c.output_dir)
        self.log_start()
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
            logger.info("%s on %d image(s); global batch %d = %d per process x %d process(es) x %d accumulation "
                        "step(s); %d steps", c.method, len(self.dataset), self.global_batch, c.train_batch_size,
                        d.world_size, c.gradient_accumulation_steps, c.max_train_steps)
        bar = tqdm(total=c.max_train_steps, initial=self.step, unit="step", desc="training", disable=not d.is_main)
        loss_sum, count, last_loss = torch.zeros((), device=self.device), 0, None
        first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=self.device)
        try:
            while self.step < c.max_train_steps:
                loss = self.train_step()
                loss_sum, count = loss_sum + loss, count + 1
                first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=self.step))
                bar.update(1)

                s = self.step
                checkpoint_now = s % c.checkpointing_steps == 0
                validate_now = bool(c.validation_prompts) and s % c.validation_steps == 0
                if checkpoint_now or validate_now or s % c.logging_steps == 0 or s == c.max_train_steps:
                    self.check_finite(first_bad)  # before anything is written
                    last_loss = d.all_mean(loss_sum / count).item()
                    loss_sum, count = torch.zeros_like(loss_sum), 0
                    self.log(last_loss, bar)
                if checkpoint_now:
                    self.save()
                if validate_now and (d.is_main or self.sharded):  # FSDP: every process runs each block
                    self.validate()
        except KeyboardInterrupt:
            logger.info("interrupted by Ctrl-C after step %d", self.step)  # in train.log: where the run stopped
            raise
        finally:
            bar.close()  # ends the bar's line, so that what follows is not printed into it
        return self.finish(last_loss)

    def check_finite(self, first_bad: torch.Tensor) -> None:
        """Raise if any process saw a NaN/inf loss (all processes take part, so all stop together)."""
        step = int(self.dist.all_min(first_bad).item())
        if step != NO_BAD_STEP:
            raise TrainingDiverged(f"the loss became NaN or infinite at step {step}; training stopped without "
                                   f"saving anything after it. {self.last_good()} Lower learning_rate or check the data.")

    def whole_adapter(self) -> dict[str, Tensor]:
        """The adapter's parameters as whole tensors (under FSDP gathered: every process takes part)."""
        parameters = adapter_parameters(self.model, self.config.method)
        return {name: full_tensor(p.detach()) for name, p in parameters.items()}

    def check_adapter_finite(self, adapter: dict[str, Tensor]) -> None:
        if not all(bool(torch.isfinite(t).all()) for t in adapter.values()):
            raise TrainingDiverged(f"the adapter weights became NaN or infinite at step {self.step}; not saved. "
                                   f"{self.last_good()}")

    def last_good(self) -> str:
        found = checkpoints(self.config.output_dir)
        return f"The last good checkpoint is {found[-1][1]}." if found else "No checkpoint had been written yet."

    def log(self, loss: float, bar: tqdm) -> None:
        skipped = f", {len(self.unreadable)} unreadable image(s) skipped" if self.unreadable else ""
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        logger.info("step %d: loss %.6g%s", self.step, loss, skipped)
        if self.tracker is not None:
            self.tracker.log({"loss": loss, "unreadable_images": len(self.unreadable)}, step=self.step)

    def save(self) -> None:
        c, d = self.config, self.dist
        # every process takes part: the union, and under FSDP the gathering of the shards
        unreadable, adapter = d.union(self.unreadable), self.whole_adapter()
        optimizer = full_optimizer_state(self.optimizer)
        if not d.is_main:
            return
        self.check_adapter_finite(adapter)
        state = {"step": self.step, "samples": self.samples, "optimizer": optimizer,
                 "rng": global_rng_state(), "unreadable": torch.tensor(sorted(unreadable), dtype=torch.int64),
                 "method": c.method, "lora_rank": c.lora_rank}
        path = save_checkpoint(c.output_dir, self.step, self.model, c.method, state, adapter)
        logger.info("saved %s", path)
        if c.checkpoints_total_limit is not None:
            for old in prune_checkpoints(c.output_dir, c.checkpoints_total_limit, newest=self.step):
                logger.info("removed %s (checkpoints_total_limit %d)", old, c.checkpoints_total_limit)

    def validation_image(self) -> Image.Image:
        """The configured validation image, else the first readable training image; centre-cropped."""
        if self._validation_image is None:
            c = self.config
            if c.validation_image is not None:
                image = to_rgb(load_image(c.validation_image))
            else:
                index, _ = self.readable_source(0)
                image = decode_image(self.dataset.raw_image(index))
            self._validation_image = center_crop(image, c.resolution)
        return self._validation_image

    def validate(self) -> Path | None:
        """Render and (rank 0) write the validation grid; under FSDP every process renders it with rank 0."""
        c = self.config
        with self.encoders.autoencoder_on_device():
            grid = validation_grid(self.pipe, c.method, self.validation_image(), c.validation_prompts,
                                   c.validation_lora_scales, steps=c.validation_num_inference_steps,
                                   guidance=c.guidance_scale, seed=c.seed)
        if not self.dist.is_main:
            return None
        path = save_png(grid, Path(c.output_dir) / "validation" / f"step-{self.step}.png")
        logger.info("validation grid: %s", path)
        if self.tracker is not None:
            import wandb

            self.tracker.log({"validation": wandb.Image(grid)}, step=self.step)
        return path

    def finish(self, loss: float | None) -> TrainResult:
        c, d = self.config, self.dist
        unreadable, adapter = d.union(self.unreadable), self.whole_adapter()  # every process takes part
        if d.is_main:
            self.check_adapter_finite(adapter)
            path = save_adapter(self.model, c.method, c.output_dir, adapter)
            logger.info("done: %d steps, adapter saved to %s; %d unreadable image(s) skipped", self.step, path,
                        len(unreadable))
        if self.tracker is not None:
            self.tracker.finish()
        d.barrier()
        return TrainResult(self.step, Path(c.output_dir), loss, len(unreadable))


# ---------------------------------------------------------------------------------------------------

def model_key(source: str) -> str:
    """What the encoding cache keys on for the frozen encoders: the model's path (resolved) or hub id."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def check_validation_image(c: TrainConfig) -> None:
    if c.validation_prompts and c.validation_image is not None:
        path = Path(c.validation_image).expanduser()
        if not path.is_file():
            raise ConfigError(f"validation_image not found: {c.validation_image}")
        load_image(path)  # a clear error now if it cannot be read


def check_same_checkpoint(resume: Path | None, c: TrainConfig, d: Distributed) -> None:
    """Every process must resume from the same checkpoint (or none). Nodes that do not share output_dir
    would not: each would look for checkpoints in its own folder."""
    found = d.gather(None if resume is None else resume.name)
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(found))
        raise CheckpointError(f"the processes found different checkpoints to resume from in output_dir "
                              f"{c.output_dir} ({seen}): every node must see the same output_dir (a shared "
                              "filesystem), or copy the checkpoint to each node's output_dir first")


def check_resumable(state: dict, c: TrainConfig, folder: Path) -> None:
    for name in ("method", "lora_rank"):
        if state.get(name) != getattr(c, name):
            raise ConfigError(f"cannot resume from {folder}: it was trained with {name}={state.get(name)!r}, "
                              f"the config says {getattr(c, name)!r}")


def start_wandb(c: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise ConfigError("report_to: wandb needs the wandb package (pip install wandb), or set report_to: none") from None
    return wandb.init(project="slideredit", config=c.to_dict(), dir=c.output_dir)


def train(config: TrainConfig, overwrite: bool = False) -> TrainResult:
    """Train an adapter as `config` says, in this process or as one rank of a torchrun job.

    A fresh run (no resume_from_checkpoint) into an output_dir that holds an earlier run's checkpoints,
    final adapter or validation grids is refused (OutputDirError) unless `overwrite`, which removes
    exactly what a run writes there (outputs.py) once the data, the model and the adapter are ready:
    a run that cannot start leaves the earlier one intact."""
    dist = setup_distributed()
    handler, level = None, logger.level
    try:
        check_output_dir(config, overwrite)  # before anything loads
        trainer = Trainer(config, dist, overwrite)  # data, model, adapter (or checkpoint); nothing written yet
        removed = clear_output_dir(config.output_dir) if overwrite and dist.is_main else []
        dist.barrier()  # the other ranks go on once rank 0 has cleared the folder
        if dist.is_main:  # the run's log file: progress, skipped images, checkpoints
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(config.output_dir) / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        if removed:
            logger.info("--overwrite: removed the earlier run's %s", ", ".join(str(p) for p in removed))
        result = trainer.run()
        del trainer  # its DDP or FSDP model holds the process group: freed here, before the group is destroyed
        return result
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()
        cleanup_distributed(dist)
