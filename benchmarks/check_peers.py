"""Are the peers doing cvae's work? Three checks, run in the benchmark venv:

    /work/bench-venv/bin/python benchmarks/check_peers.py [--steps 300] [--checks sheets,mlp,conv]

1. The same model: jax_cvae and torch_cvae (fp32) train `full` from the same batches for --steps
   steps, each with its own initial weights and eps draws; the mean losses over windows of steps
   are printed side by side and must agree within 3% (they differ only by those draws).
2. The same sheets: torch_generate.py writes a few digits with a small --max-rows; its sheets are
   read back with cvae's own reader and must be exactly what cvae.images.render_sheet makes of
   their cells, with black padding cells where cvae generate pads each digit's last row.
   (cvae.images needs only NumPy, so it is imported from the repository, not installed.)
3. The conv model (issue 17): torch_cvae's ConvCVAE has, at the defaults and at another size,
   exactly the parameters the issue's architecture counts (peer_data.conv_param_count, from the
   text, layer by layer) and the issue's map sizes (28 -> 14 -> 7 -> 14 -> 28); its loss falls
   in training (fp32 and bf16 autocast); and fused Adam (the --fused rows) takes the same steps
   as the default Adam from the same start (the losses agree to 1e-3 relative), and so does the
   step with the forward and loss through torch.compile (the --compile rows). Then jax_cvae's
   conv and torch_cvae's train side by side as in 1, from the same initial weights (PyTorch's,
   in JAX's layouts), so their losses differ only by the eps draws.
Exit code 0 when all hold, 1 otherwise.
"""
import argparse, glob, math, os, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for cvae.images

import numpy as np


def jax_weights_of(model):
    """torch_cvae.ConvCVAE's weights in jax_cvae.conv_net's structure and layouts: kernels HWIO
    (a transposed conv's (C_in, C_out, 4, 4) as 4,4,C_in,C_out: the flip is in conv_net), fc
    weights (in, out), and the fc rows/columns next to the maps permuted from PyTorch's CHW
    flatten order to JAX's HWC."""
    t = lambda a: a.detach().numpy()
    c2 = model.c2
    hwc = np.arange(c2 * 49).reshape(c2, 7, 7).transpose(1, 2, 0).ravel()  # JAX index -> PyTorch index
    enc1 = t(model.enc_fc[0].weight).T
    return [(t(model.enc_conv[0].weight).transpose(2, 3, 1, 0), t(model.enc_conv[0].bias)),
            (t(model.enc_conv[2].weight).transpose(2, 3, 1, 0), t(model.enc_conv[2].bias)),
            (np.concatenate([enc1[:c2 * 49][hwc], enc1[c2 * 49:]]), t(model.enc_fc[0].bias)),
            (t(model.enc_fc[2].weight).T, t(model.enc_fc[2].bias)),
            (t(model.dec_fc[0].weight).T, t(model.dec_fc[0].bias)),
            (t(model.dec_fc[2].weight).T[:, hwc], t(model.dec_fc[2].bias)[hwc]),
            (t(model.dec_conv[0].weight).transpose(2, 3, 0, 1), t(model.dec_conv[0].bias)),
            (t(model.dec_conv[2].weight).transpose(2, 3, 0, 1), t(model.dec_conv[2].bias))]


def same_model(steps, variant="full"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # before jax starts its pools
    import torch
    import jax_cvae, torch_cvae
    from peer_data import digits_of, load_mnist_np

    torch.manual_seed(0)
    torch_cvae.set_threads(1)
    x, y = load_mnist_np("train", digits_of(variant))
    model, opt = torch_cvae.make_model(variant)
    # The MLPs start from their own random weights. The conv model's last bias is one number that
    # shifts all 784 logits (about +-90 nats at step 0), so it starts from PyTorch's weights.
    init = jax_weights_of(model) if variant == "conv" else None
    step, params, state, key = jax_cvae.build(variant, 64, init=init)
    rng, jl, tl = np.random.default_rng(1), [], []
    for _ in range(steps):
        idx = rng.integers(0, len(x), 64)
        params, state, key, loss = step(params, state, key, x[idx], y[idx].astype(np.int32))
        jl.append(float(loss))
        tl.append(torch_cvae.train_step(model, opt, torch.from_numpy(x[idx]), torch.from_numpy(y[idx])).item())
    ok = True
    for a, b in ((0, 1), (steps // 3, steps // 3 + 20), (steps - 20, steps)):
        j, t = np.mean(jl[a:b]), np.mean(tl[a:b])
        good = abs(j - t) <= 0.03 * t
        ok &= good
        print(f"{variant} steps {a}-{b - 1}: mean loss jax {j:.2f}, torch {t:.2f}{'' if good else '  <- differ by more than 3%'}")
    return ok


def same_sheets():
    from cvae.images import read_pgm, render_sheet

    per_digit, cols, max_rows = 30, 20, 3
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(HERE, "torch_generate.py"), "--per-digit", str(per_digit),
                        "--max-rows", str(max_rows), "--threads", "1", "--out", os.path.join(d, "x.pgm")], check=True)
        files = sorted(glob.glob(os.path.join(d, "x-*.pgm")))
        cells = []
        for path in files:
            image = read_pgm(path)
            rows = (image.shape[0] + 2) // 30
            sheet = np.stack([image[r * 30:r * 30 + 28, c * 30:c * 30 + 28].ravel()
                              for r in range(rows) for c in range(cols)])
            if not np.array_equal(render_sheet(sheet, cols), image):
                print(f"{path}: not the layout cvae.images.render_sheet makes")
                return False
            cells.append(sheet)
    cells = np.concatenate(cells)
    block = math.ceil(per_digit / cols) * cols  # each digit padded to whole rows, as cvae.sheets.sample_layout
    blank = np.tile(np.arange(block) >= per_digit, 10)
    expected_sheets = math.ceil(10 * block / (cols * max_rows))
    ok = (len(files) == expected_sheets and len(cells) == 10 * block and not cells[blank].any()
          and bool((cells[~blank].max(1) > 0).all()))
    print(f"torch_generate: {len(files)} sheets (expected {expected_sheets}), {len(cells)} cells, "
          f"{int(blank.sum())} blank: {'the layout of cvae generate' if ok else 'NOT the layout of cvae generate'}")
    return ok


def conv_model(steps):
    import torch
    import torch_cvae
    from peer_data import CONV_VARIANTS, conv_param_count, load_mnist_np

    ok = True
    for arch in (torch_cvae.conv_arch("conv"), ((16, 32), 256, 64)):
        model, _ = torch_cvae.make_model("conv", arch=arch)
        (c1, c2), hidden, latent = arch
        have, want = sum(p.numel() for p in model.parameters()), conv_param_count(*arch)
        with torch.no_grad():
            x = torch.zeros(2, 784)
            maps = [tuple(model.enc_conv[:2](x.view(-1, 1, 28, 28)).shape[1:]),
                    tuple(model.enc_conv(x.view(-1, 1, 28, 28)).shape[1:]),
                    tuple(model.dec_conv[:2](torch.zeros(2, c2, 7, 7)).shape[1:])]
            logits, mu, _ = model(x, torch.tensor([3, 7]))
        good = (have == want and maps == [(c1, 14, 14), (c2, 7, 7), (c1, 14, 14)]
                and tuple(logits.shape) == (2, 784) and tuple(mu.shape) == (2, latent))
        ok &= good
        print(f"conv {c1},{c2} H {hidden} L {latent}: {have:,} parameters (the issue's architecture: {want:,}), "
              f"maps {maps}, logits {tuple(logits.shape[1:])}{'' if good else '  <- NOT the issue model'}")

    torch_cvae.set_threads(1)
    x, y = load_mnist_np("train", CONV_VARIANTS["conv"][3])
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, len(x), 64) for _ in range(steps)]
    losses = {}
    for name, precision, fused in (("fp32", "fp32", False), ("fp32 fused", "fp32", True),
                                   ("bf16", "bf16", False)):
        torch.manual_seed(0)  # the same initial weights and eps draws for each
        model, opt = torch_cvae.make_model("conv", fused=fused)
        losses[name] = [torch_cvae.train_step(model, opt, torch.from_numpy(x[i]), torch.from_numpy(y[i]),
                                              precision=precision).item() for i in batches]
    for name, l in losses.items():
        first, last = l[0], float(np.mean(l[-20:]))
        good = bool(np.isfinite(l).all()) and last < 0.5 * first
        ok &= good
        print(f"conv {name}: loss {first:.2f} at step 0, {last:.2f} over steps {steps - 20}-{steps - 1}"
              f"{'' if good else '  <- does not fall to half'}")
    # the --compile rows: the same forward and loss through torch.compile (compiles at step 0).
    # Inductor draws randn_like from its own generator, unlike eager; fallback_random makes it
    # use eager's, so that the eps draws, and then the losses, can be compared here.
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    torch.manual_seed(0)
    model, opt = torch_cvae.make_model("conv", fused=True)
    forward = torch.compile(torch_cvae.forward_loss)
    losses["fp32 fused compiled"] = [
        torch_cvae.train_step(model, opt, torch.from_numpy(x[i]), torch.from_numpy(y[i]), forward=forward).item()
        for i in batches[:30]]
    for name, what in (("fp32 fused", "fused Adam against the default Adam"),
                       ("fp32 fused compiled", "torch.compile (fused Adam) against eager")):
        a, b = np.array(losses["fp32"][:30]), np.array(losses[name][:30])
        gap = float(np.max(np.abs(a - b) / a))
        ok &= gap < 1e-3
        print(f"conv {what}, steps 0-29: largest relative loss gap {gap:.1e}"
              f"{'' if gap < 1e-3 else '  <- not the same step'}")
    return ok


CHECKS = ("sheets", "mlp", "conv")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checks", default=",".join(CHECKS), help=f"which, comma-separated, of {', '.join(CHECKS)}")
    a = p.parse_args()
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    if not checks or set(checks) - set(CHECKS):
        p.error(f"--checks {a.checks}: choose from {', '.join(CHECKS)}")
    ok = True
    if "sheets" in checks:
        ok &= same_sheets()  # first: same_model pins this process to one CPU
    if "mlp" in checks:
        ok &= same_model(max(a.steps, 40))
    if "conv" in checks:
        ok &= conv_model(max(a.steps // 3, 40))
        ok &= same_model(max(a.steps // 3, 40), "conv")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
