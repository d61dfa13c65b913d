"""python -m vit [IMAGE] [--model NAME] [--backend auto|triton|einsum] [--batch N]

The tutorial's pipeline on one image (the shipped cat by default): load it, cut it into
patches, embed them, run the encoder, and print the shape after each step, the model summary
and the top-5 logits. With CUDA, the fused and the reference backends run side by side.
The weights are random (there is no model hub here), so the classes mean nothing yet.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from einops import rearrange

import kernels
from vit.image import CAT_PATH, load_image
from vit.model import PRESETS, create_model
from vit.summary import count_parameters, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit", description=__doc__.split("\n\n")[1])
    parser.add_argument("image", nargs="?", default=None, help=f"an image file (default: the shipped cat, {CAT_PATH})")
    parser.add_argument("--model", default="vit_base_patch16_224", choices=list(PRESETS), metavar="NAME",
                        help="a preset: " + ", ".join(PRESETS))
    parser.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                        help="triton (fused, CUDA), einsum (reference), auto (triton on CUDA, einsum on CPU)")
    parser.add_argument("--batch", type=int, default=1, help="repeat the image into a batch of N (default 1)")
    return parser.parse_args(argv)


def time_forward(model: torch.nn.Module, images: torch.Tensor, repeats: int = 10) -> float:
    """Seconds per forward, after a warm-up that compiles and autotunes the kernels."""
    with torch.no_grad():
        model(images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch < 1:
        print(f"python -m vit: --batch must be at least 1, got {args.batch}", file=sys.stderr)
        return 2
    kernels.set_backend(args.backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if args.backend == "triton":
            print("python -m vit: --backend triton needs a CUDA GPU, and none is present", file=sys.stderr)
            return 2
        print("No CUDA device: the einsum reference path runs (the Triton kernels need a GPU; "
              "the tests run them on the CPU through TRITON_INTERPRET=1).")
    config = PRESETS[args.model]
    torch.manual_seed(0)

    # 1. The image, resized, as a batch: (B, 3, H, W).
    try:
        image = load_image(args.image, size=config.image_size)
    except (OSError, ValueError, ImportError) as error:  # missing, unreadable, a directory, not an image
        print(f"python -m vit: {error}", file=sys.stderr)
        return 2
    images = image.expand(args.batch, -1, -1, -1).to(device)
    print(f"1. image {args.image or CAT_PATH}: {tuple(images.shape)}")

    # 2. Cut into patches, each flattened in (s1 s2 c) order: (B, N, P * P * C).
    p = config.patch_size
    patches = rearrange(images, "b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=p, s2=p)
    print(f"2. {p}x{p} patches: {tuple(patches.shape)}")

    # On the CPU the reference runs by design (said above), so the fused flag is off there.
    model = create_model(args.model, fused=device == "cuda" and args.backend != "einsum").to(device).eval()
    with torch.no_grad():
        # 3-4. Projected, class token prepended, position embeddings added: (B, 1 + N, E).
        tokens = model.patch_embed(images)
        print(f"3. patch embedding + class token + position embeddings: {tuple(tokens.shape)}")
        # 5. One encoder block: multi-head attention and the MLP keep the shape.
        attended = model.blocks[0].attn(model.blocks[0].norm1(tokens))
        print(f"4. multi-head attention ({config.num_heads} heads of {config.head_dim}): {tuple(attended.shape)}")
        features = model.forward_features(images)
        print(f"5. {config.depth} encoder blocks + final norm: {tuple(features.shape)}")
        logits = model.forward_head(features)
        print(f"6. classification head: {tuple(logits.shape)}")

    print(f"\n{args.model}: {count_parameters(model):,} parameters\n")
    print(summary(model, images[:1]))

    top = logits[0].float().softmax(-1).topk(5)
    print("\ntop-5 (random weights, so the classes mean nothing yet):")
    for prob, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  class {index:4d}: {prob:.4f}")

    if device == "cuda":
        reference = create_model(args.model, fused=False).to(device).eval()
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            difference = (model(images).float() - reference(images).float()).abs().max().item()
        fused_time, reference_time = time_forward(model, images), time_forward(reference, images)
        print(f"\nfused vs reference: max abs difference {difference:.3e}")
        print(f"  time per forward (batch {args.batch}): fused {fused_time * 1e3:.2f} ms, "
              f"reference {reference_time * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
