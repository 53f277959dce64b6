"""Train a small causal LM built from a `transformers` config (Llama, 2 layers, random init, the library's
default attention implementation, SDPA) with ESGD-M on the character data of the benchmarks
(benchmarks/convergence.py's char-transformer corpus: Python standard-library source). Offline.

Why finite differences: on CPU, SDPA runs a fused attention kernel whose backward has no derivative, so
the exact Hessian-vector product (a double backward) fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (the fused CUDA kernels
have none either). ESGD(hvp="finite_difference") needs first-order gradients only:
Hz = (g(theta + h z) - g(theta)) / h, one extra forward and backward per estimation step, taken by
calling the step's closure at perturbed parameters. The model must be deterministic within a step (the
Llama config's dropout is 0).

Two ways to drive it (`--loop`):

- `torch` (default): a plain PyTorch loop, `opt.step(closure)`.
- `trainer`: `transformers.Trainer` through a small subclass (ESGDTrainer below): its `training_step`
  runs `optimizer.step(closure)` with the Trainer's own loss computation and backward in the closure.
  The Trainer calls `optimizer.step()` again after `training_step`; that call finds no closure and
  does nothing (ClosureOnlyESGD). Gradient clipping (`max_grad_norm`) would act after the step,
  so it is off, and gradient accumulation is refused (the step would run per micro-batch).

`--curvature-fraction F` (for example 0.25) takes Hz from the first F of each batch:
`opt.step(closure, curvature_closure=...)` runs the closure once (the update's gradient on the whole
batch) and the curvature closure at theta and theta + h z on the slice, so an estimation step costs
1 + 2F passes instead of 2.

    python examples/hf_transformers_esgd.py                  # 60 steps, plain PyTorch loop
    python examples/hf_transformers_esgd.py --loop trainer --steps 100
    python examples/hf_transformers_esgd.py --loop trainer --curvature-fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never reach the hub

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import esgd_cuda
from esgd_cuda import ESGD

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from convergence import _stdlib_text  # noqa: E402  (the benchmarks' char corpus)


def esgd_kernels() -> str:
    """Which esgd_cuda runs and whether its fused kernels loaded: an unbuilt source checkout ahead of
    the installed package on sys.path would run everything on the slower pure-PyTorch path."""
    info = esgd_cuda.extension_info()
    status = "native kernels loaded" if info["loaded"] else f"native kernels NOT loaded ({info['load_error']})"
    return f"esgd_cuda {os.path.dirname(esgd_cuda.__file__)}: {status}"


def build_model(vocab: int, context: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    model.train()
    return model


class CharWindows(torch.utils.data.Dataset):
    """Windows of `context` characters of the training text, starting every `stride` characters."""

    def __init__(self, ids: torch.Tensor, context: int, stride: int):
        self.ids, self.context = ids, context
        self.starts = torch.arange(0, len(ids) - context, stride)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        window = self.ids[self.starts[i]: self.starts[i] + self.context]
        return {"input_ids": window, "labels": window}


class ClosureOnlyESGD(ESGD):
    """ESGD for ESGDTrainer: stepped inside training_step with a closure; the Trainer's own
    closure-less optimizer.step() that follows is a no-op."""

    def step(self, closure=None, curvature_closure=None):
        return None if closure is None else super().step(closure, curvature_closure=curvature_closure)


class ESGDTrainer(Trainer):
    def __init__(self, *args, esgd_kwargs: dict, curvature_fraction: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("ESGDTrainer steps inside training_step: use gradient_accumulation_steps=1")
        self.esgd_kwargs = esgd_kwargs
        self.curvature_fraction = curvature_fraction
        self.step_losses: list[float] = []
        self.curvature_passes = 0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.esgd = ClosureOnlyESGD(self.model.parameters(), lr=self.args.learning_rate, **self.esgd_kwargs)
            self.optimizer = self.esgd
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure():
            self.esgd.zero_grad()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self.accelerator.backward(loss)
            return loss.detach()

        # ESGD itself, not accelerate's wrapper (self.optimizer), whose step() drops the return value.
        # The closure's first call gives the loss at the parameters.
        curvature_closure = self.curvature_closure(model, inputs) if self.curvature_fraction < 1.0 else None
        loss = self.esgd.step(closure, curvature_closure=curvature_closure)
        self.step_losses.append(loss.item())
        return loss

    def curvature_closure(self, model, inputs):
        """The Trainer's loss and backward on the first curvature_fraction of the batch."""
        n = max(1, int(len(inputs["input_ids"]) * self.curvature_fraction))
        head = {k: v[:n] if torch.is_tensor(v) else v for k, v in inputs.items()}

        def closure():
            self.curvature_passes += 1
            self.esgd.zero_grad()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, head)
            self.accelerator.backward(loss)
            return loss.detach()

        return closure


class PrintLoss(TrainerCallback):
    def __init__(self, losses: list[float], every: int):
        self.losses, self.every = losses, every

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step - 1
        if step % self.every == 0 or state.global_step == state.max_steps:
            print(f"step {step:4d}  loss {self.losses[-1]:.4f}", flush=True)


def train_torch_loop(model, train_ids, args) -> tuple[ESGD, list[float]]:
    opt = ESGD(model.parameters(), lr=args.lr, hvp=args.hvp, seed=args.seed)
    batches = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.context)
    losses = []
    opt.curvature_passes = 0
    n = max(1, int(args.batch_size * args.curvature_fraction))
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.context, (args.batch_size,), generator=batches)
        x = train_ids[starts[:, None] + offsets]

        def closure(x=x):
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        def curvature_closure():
            opt.curvature_passes += 1
            return closure(x[:n])

        losses.append(opt.step(closure, curvature_closure if args.curvature_fraction < 1.0 else None).item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    return opt, losses


def train_with_trainer(model, train_ids, args) -> tuple[ESGD, list[float]]:
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=0.0,
            gradient_accumulation_steps=1, use_cpu=True, seed=args.seed, data_seed=args.seed,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = ESGDTrainer(model=model, args=training_args,
                              train_dataset=CharWindows(train_ids, args.context, stride=args.context // 2),
                              esgd_kwargs=dict(hvp=args.hvp, seed=args.seed),
                              curvature_fraction=args.curvature_fraction)
        trainer.add_callback(PrintLoss(trainer.step_losses, every=max(1, args.steps // 10)))
        trainer.train()
    trainer.esgd.curvature_passes = trainer.curvature_passes
    return trainer.esgd, trainer.step_losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--loop", choices=["torch", "trainer"], default="torch")
    parser.add_argument("--hvp", choices=["finite_difference", "central_difference"], default="finite_difference")
    parser.add_argument("--curvature-fraction", type=float, default=1.0,
                        help="take Hz from this fraction of each batch (default 1: the whole batch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(esgd_kernels(), flush=True)
    if not 0.0 < args.curvature_fraction <= 1.0:
        parser.error(f"--curvature-fraction must be in (0, 1], got {args.curvature_fraction}")

    train_ids, test_ids, vocab = _stdlib_text("cpu")
    model = build_model(vocab, args.context, args.seed)
    print(f"Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, attention: "
          f"{model.config._attn_implementation}, vocab {vocab}; {len(train_ids)} training characters")
    train = train_torch_loop if args.loop == "torch" else train_with_trainer
    opt, losses = train(model, train_ids, args)

    window = max(1, min(10, len(losses) // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"training loss: {first:.4f} (mean of the first {window} steps) -> {last:.4f} (last {window})")
    model.eval()
    with torch.no_grad():
        x = test_ids[: (len(test_ids) // args.context) * args.context].view(-1, args.context)[:32]
        test_loss = model(input_ids=x, labels=x).loss.item()
    print(f"test loss: {test_loss:.4f} nats/char")
    if args.curvature_fraction < 1.0:
        print(f"curvature closure passes: {opt.curvature_passes}")
    print("ESGD-M diagnostics:", json.dumps(opt.diagnostics()))


if __name__ == "__main__":
    main()
