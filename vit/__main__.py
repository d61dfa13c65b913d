"""python -m vit [IMAGE ...] [--model NAME] [--pretrained | --weights FILE] [--backend auto|triton|einsum]
                [--batch N | --native]

The tutorial's pipeline on one image (the shipped cat by default): load it, cut it into
patches, embed them, run the encoder, and print the shape after each step, the model summary,
the top-5 classes and the time per forward. With --pretrained (timm's weights, through the
Hugging Face hub's cache) or --weights FILE (a checkpoint) the image is prepared as those
weights were trained (resize, centre crop, mean and std from timm's pretrained config) and
the top-5 are ImageNet classes by name; without, the weights are random and the image is
resized to [0, 1] as in the tutorial. With CUDA, the fused and the reference backends run
side by side, and with real weights their top-5 must agree.

Bad input (an image that is missing, unreadable or too large, a batch below 1 or too big for
the free memory, weights that cannot be fetched, are not a checkpoint, hold NaN or infinity or
do not fit the model, a VITRITON_BACKEND that names no backend) ends in one line on stderr and
exit status 2; a fused top-5 that differs from the reference's in exit status 1. Without
--backend the calling thread's backend runs (VITRITON_BACKEND's, else auto); it holds for this
thread during the run (``kernels.use_backend``), so ``main()`` leaves no global state behind.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from einops import rearrange

import kernels
from vit import pretrained
from vit.image import CAT_PATH, image_size, load_image
from vit.model import PRESETS, ViTConfig, create_model
from vit.summary import count_parameters, summary

GiB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vit", description=__doc__.split("\n\n")[1])
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help=f"image files (default: the shipped cat, {CAT_PATH}); several run packed in one sequence")
    parser.add_argument("--native", action="store_true",
                        help="keep each image's own size, rounded to the patch size, and pack them (NaViT-style)")
    parser.add_argument("--model", default="vit_base_patch16_224", choices=list(PRESETS), metavar="NAME",
                        help="a preset: " + ", ".join(PRESETS))
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights for NAME (timm.create_model(NAME, pretrained=True): "
                              "the Hugging Face hub, once, then its cache); needs timm")
    weights.add_argument("--weights", metavar="FILE",
                         help="a checkpoint for NAME: timm's or vit's state dict, as .safetensors, .pth, .pt or .bin; "
                              "needs timm (preprocessing and class names)")
    parser.add_argument("--backend", choices=kernels.BACKENDS,
                        help="triton (fused, CUDA), einsum (reference), auto (triton on CUDA, einsum on CPU); "
                             "default: VITRITON_BACKEND, else auto")
    parser.add_argument("--batch", type=int, default=1, help="repeat the image into a batch of N (default 1)")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"python -m vit: {message}", file=sys.stderr)
    return 2


def bytes_per_image(config: ViTConfig) -> int:
    """The memory one image of the batch needs at least, in bytes: what is alive at once when
    the first block's GELU runs, in float32. The patches, the tokens and the attention output
    kept for printing, the residual stream and its norm (E wide each), the MLP's first layer
    and its GELU (hidden wide each). The real peak is higher (temporaries, the allocator's
    fragmentation): 1.5 to 5 times this on the CPU (tests/vit/test_main.py), so a batch this
    refuses cannot run, and one it lets through may still run out (caught in ``main``).
    """
    tokens = config.num_patches + int(config.class_token)
    hidden = int(config.embed_dim * config.mlp_ratio)
    pixels = config.in_channels * config.image_size**2
    return 4 * (pixels + tokens * (4 * config.embed_dim + 2 * hidden))


def free_memory(device: str) -> int | None:
    """Bytes free for new tensors on the device; None where that cannot be told."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    free = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
    except OSError:  # not Linux
        pass
    try:  # a container's own limit (cgroup v2), which MemAvailable does not show
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def memory_problem(name: str, batch: int, device: str) -> str | None:
    """Why the batch cannot fit in the free memory, found before any work; None if it may.

    Without this a batch far too big ends in a traceback from the allocator or, where Linux
    overcommits memory, in the kernel's OOM killer ending the process without a word.
    """
    free = free_memory(device)
    if free is None:
        return None
    with torch.device("meta"):  # the parameter count without allocating the parameters
        weights = 4 * count_parameters(create_model(name, fused=False))
    if device == "cuda":
        weights *= 2  # the reference model runs beside the fused one
    needed = weights + batch * bytes_per_image(PRESETS[name])
    if needed <= free:
        return None
    return (
        f"--batch {batch} needs at least {needed / GiB:.1f} GiB for {name} on {device}, "
        f"but {free / GiB:.1f} GiB is free: use a smaller --batch"
    )


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is a failed allocation: CUDA's, Python's, or PyTorch's CPU allocator's."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(words in str(error) for words in ("DefaultCPUAllocator", "not enough memory", "out of memory"))


def load_weights(args: argparse.Namespace) -> pretrained.Weights:
    """The real weights asked for, with a line while they load (timm shows its download's progress)."""
    started = time.perf_counter()
    if args.pretrained:
        print(f"loading timm's pretrained {args.model} (from the Hugging Face hub's cache, downloaded there "
              "the first time) ...", flush=True)
        weights = pretrained.load_pretrained(args.model)
    else:
        print(f"loading {args.weights} ...", flush=True)
        weights = pretrained.load_weights_file(args.weights, args.model)
    print(f"loaded {weights.source} in {time.perf_counter() - started:.1f} s")
    return weights


def time_forward(model: torch.nn.Module, images: torch.Tensor, repeats: int = 10) -> float:
    """Seconds per forward on CUDA, after a warm-up that compiles and autotunes the kernels."""
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
    args.image = args.images[0] if args.images else None
    if args.batch < 1:
        return fail(f"--batch must be at least 1, got {args.batch}")
    packed = args.native or len(args.images) > 1
    if packed and args.batch != 1:
        return fail("--batch repeats one image; with several images or --native each image runs once, packed")
    chosen_by = "--backend "
    if args.backend is None:  # the calling thread's backend: VITRITON_BACKEND's, else auto
        try:
            args.backend = kernels.get_backend()
        except ValueError as error:  # a VITRITON_BACKEND naming no backend
            return fail(str(error))
        chosen_by = "VITRITON_BACKEND="
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.backend == "triton":
        return fail(f"{chosen_by}triton needs a CUDA GPU, and none is present")
    problem = memory_problem(args.model, args.batch, device)
    if problem:
        return fail(problem)
    config = PRESETS[args.model]
    weights = None
    if args.pretrained or args.weights is not None:
        try:
            weights = load_weights(args)
        except (OSError, ValueError, ImportError) as error:  # no timm, no hub, no file, or weights that do not fit
            return fail(str(error))
    # The tutorial's plain resize to [0, 1], unless the weights were trained on images prepared otherwise.
    preprocessing = weights.preprocessing if weights else None
    try:
        if packed:
            images = [load_packed_image(path, config, preprocessing, native=args.native) for path in args.images or [None]]
        elif preprocessing:
            image = preprocessing.load(args.image)
        else:
            image = load_image(args.image, size=config.image_size)
    except (OSError, ValueError, ImportError) as error:  # missing, unreadable, a directory, not an image, too large
        return fail(str(error))
    if device == "cpu":
        print("No CUDA device: the einsum reference path runs (the Triton kernels need a GPU; "
              "the tests run them on the CPU through TRITON_INTERPRET=1).")

    with kernels.use_backend(args.backend):
        try:
            if packed:
                run_packed(args, config, images, device, weights)
            else:
                return run(args, config, image, device, weights)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return fail(f"--batch {args.batch} ran out of memory on {device} ({reason}); try a smaller --batch")
    return 0


def run(
    args: argparse.Namespace, config: ViTConfig, image: torch.Tensor, device: str, weights: pretrained.Weights | None
) -> int:
    """The tutorial's pipeline on ``image`` (1, 3, H, W), printed step by step; the exit status."""
    torch.manual_seed(0)

    # 1. The image, prepared, as a batch: (B, 3, H, W).
    images = image.expand(args.batch, -1, -1, -1).to(device)
    print(f"1. image {args.image or CAT_PATH}: {tuple(images.shape)}")

    # 2. Cut into patches, each flattened in (s1 s2 c) order: (B, N, P * P * C).
    p = config.patch_size
    patches = rearrange(images, "b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=p, s2=p)
    print(f"2. {p}x{p} patches: {tuple(patches.shape)}")

    # On the CPU the reference runs by design (said above), so the fused flag is off there.
    model = create_model(args.model, fused=device == "cuda" and args.backend != "einsum")
    if weights:
        model.load_state_dict(weights.state_dict)
    model = model.to(device).eval()
    with torch.no_grad():
        # 3-4. Projected, class token prepended, position embeddings added: (B, 1 + N, E).
        tokens = model.patch_embed(images)
        print(f"3. patch embedding + class token + position embeddings: {tuple(tokens.shape)}")
        # 5. One encoder block: multi-head attention and the MLP keep the shape.
        attended = model.blocks[0].attn(model.blocks[0].norm1(tokens))
        print(f"4. multi-head attention ({config.num_heads} heads of {config.head_dim}): {tuple(attended.shape)}")
        started = time.perf_counter()
        features = model.forward_features(images)
        print(f"5. {config.depth} encoder blocks + final norm: {tuple(features.shape)}")
        logits = model.forward_head(features)
        seconds = time.perf_counter() - started
        print(f"6. classification head: {tuple(logits.shape)}")

    print(f"\n{args.model}: {count_parameters(model):,} parameters\n")
    print(summary(model, images[:1]))

    print()
    print_top5(logits[0], weights)

    if device == "cpu":
        print(f"\ntime per forward (batch {args.batch}, one forward on the CPU): {seconds * 1e3:.1f} ms")
        return 0
    reference = create_model(args.model, fused=False).to(device).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        fused_logits, reference_logits = model(images).float(), reference(images).float()
    difference = (fused_logits - reference_logits).abs().max().item()
    fused_time, reference_time = time_forward(model, images), time_forward(reference, images)
    print(f"\nfused vs reference: max abs difference {difference:.3e}")
    print(f"  time per forward (batch {args.batch}): fused {fused_time * 1e3:.2f} ms, "
          f"reference {reference_time * 1e3:.2f} ms")
    if weights:
        # Real weights give a real answer: the fused kernels must give the reference's.
        disagreement = top5_disagreement(fused_logits, reference_logits)
        if disagreement:
            print(f"python -m vit: {disagreement}", file=sys.stderr)
            return 1
        print("  top-5: the same classes in the same order")
    return 0


def top5_disagreement(fused_logits: torch.Tensor, reference_logits: torch.Tensor) -> str | None:
    """Where the fused and the reference logits (B, num_classes) rank other top-5 classes, the
    first such image in one line; None where every image's top-5 is the same, in the same order."""
    fused_top, reference_top = fused_logits.topk(5).indices, reference_logits.topk(5).indices  # (B, 5)
    differing = (fused_top != reference_top).any(dim=-1).nonzero()
    if len(differing) == 0:
        return None
    i = differing[0, 0].item()
    return (f"image {i} of the batch: the fused top-5 classes {fused_top[i].tolist()} differ from the "
            f"reference's {reference_top[i].tolist()}")


def print_top5(logits: torch.Tensor, weights: pretrained.Weights | None, indent: str = "") -> None:
    """The five most probable classes of one image's ``logits`` (num_classes,): by name with real weights."""
    top = logits.float().softmax(-1).topk(5)
    if weights:
        print(f"{indent}top-5 ImageNet classes:")
    else:
        print(f"{indent}top-5 classes (random weights: --pretrained or --weights FILE gives a real answer):")
    for probability, index in zip(top.values.tolist(), top.indices.tolist()):
        name = weights.class_names[index] if weights else f"class {index}"
        print(f"{indent}  {probability:.4f}  {name}")


def native_size(path: str | None, patch: int) -> tuple[int, int]:
    """The image's upright (height, width), each rounded to the nearest multiple of ``patch`` (halves up, at least one)."""
    height, width = image_size(path)
    return tuple(max(patch, int(side / patch + 0.5) * patch) for side in (height, width))


def load_packed_image(
    path: str | None, config: ViTConfig, preprocessing: pretrained.Preprocessing | None, *, native: bool
) -> torch.Tensor:
    """One image of a packed run: at its own size rounded to the patch (``native``), else the model's."""
    if not native:
        return preprocessing.load(path) if preprocessing else load_image(path, size=config.image_size)
    size = native_size(path, config.patch_size)
    return preprocessing.load(path, size=size) if preprocessing else load_image(path, size=size)


def run_packed(
    args: argparse.Namespace, config: ViTConfig, images: list[torch.Tensor], device: str,
    weights: pretrained.Weights | None,
) -> None:
    """Several images of different sizes in one packed sequence: each attends only to itself."""
    model = create_model(args.model, fused=device == "cuda" and args.backend != "einsum")
    if weights:
        model.load_state_dict(weights.state_dict)
    model = model.to(device).eval()
    images = [image.to(device) for image in images]
    p, prefix = config.patch_size, int(config.class_token)
    lengths = [prefix + (image.shape[-2] // p) * (image.shape[-1] // p) for image in images]
    print(f"packing {len(images)} images, {p}x{p} patches, one sequence of {sum(lengths)} tokens:")
    start = 0
    for path, image, length in zip(args.images or [CAT_PATH], images, lengths):
        print(f"  {path}: {tuple(image.shape[-2:])} -> {length} tokens, rows {start}:{start + length}")
        start += length
    print(f"  cu_seqlens = {[0, *itertools.accumulate(lengths)]}: one attention_varlen call per layer ({config.depth})")
    with torch.no_grad():
        started = time.perf_counter()
        logits = model(images)  # (images, num_classes)
        seconds = time.perf_counter() - started
    print(f"logits: {tuple(logits.shape)}; time per forward: {seconds * 1e3:.1f} ms")
    for path, row in zip(args.images or [CAT_PATH], logits):
        print(f"  {path}:")
        print_top5(row, weights, indent="    ")


if __name__ == "__main__":
    sys.exit(main())
