"""Independent NumPy reference for one conditional-VAE training step.

Shares no code with ``cvae``: everything here is written from the math, in
float64 by default (pass ``dtype=np.float32`` to get a float32 twin, used only to
measure how much plain float32 rounding moves each quantity).

Model (per image; the batch loss is the mean over images):

    a0 = [x ; onehot(y)]                      x = pixels / 255
    h1 = act(a0 @ W1.T + b1)                  enc1
    h2 = act(h1 @ W2.T + b2)                  enc2
    o  = h2 @ W3.T + b3;  mu = o[:, :L], logvar = o[:, L:]   enc3
    z  = mu + eps * exp(logvar / 2)
    d0 = [z ; onehot(y)]
    g1 = act(d0 @ W4.T + b4)                  dec1
    g2 = act(g1 @ W5.T + b5)                  dec2
    logits = g2 @ W6.T + b6                   dec3
    rec = sum_pixels max(l, 0) - l * x + log1p(exp(-|l|))
    kl  = -1/2 sum(1 + logvar - mu^2 - exp(logvar))
    loss = rec + beta * kl
"""

import numpy as np

X_DIM = 784
N_CLASSES = 10
LAYERS = ("enc1", "enc2", "enc3", "dec1", "dec2", "dec3")
PARAM_NAMES = tuple(f"{layer}.{kind}" for layer in LAYERS for kind in ("W", "b"))
ACT_NAMES = ("enc1", "enc2", "dec1", "dec2", "mu", "logvar", "z", "logits")


# --------------------------------------------------------------------------- activations

def act_forward(pre, act):
    if act == "elu":
        return np.where(pre > 0, pre, np.expm1(np.minimum(pre, 0)))
    if act == "relu":
        return np.maximum(pre, 0)
    raise ValueError(f"unknown activation {act!r}")


def act_backward(grad_post, pre, act):
    """Gradient w.r.t. the pre-activation, given the gradient w.r.t. the output."""
    if act == "elu":
        return grad_post * np.where(pre > 0, 1.0, np.exp(np.minimum(pre, 0)))
    if act == "relu":
        return grad_post * (pre > 0)
    raise ValueError(f"unknown activation {act!r}")


def onehot(labels, dtype=np.float64):
    labels = np.asarray(labels).astype(np.int64)
    out = np.zeros((labels.shape[0], N_CLASSES), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


# --------------------------------------------------------------------------- one step

def forward_backward(params, pixels, labels, eps, beta, act, dtype=np.float64):
    """Loss (batch means) and gradients of the batch-mean loss.

    Returns (loss, rec, kl, grads, acts, act_grads):
      grads:     same keys as params
      acts:      "enc1", "enc2", "dec1", "dec2" (post-activation), "mu", "logvar", "z", "logits"
      act_grads: d loss / d pre-activation of "enc1", "enc2", "dec1", "dec2";
                 d loss / d "mu", "logvar", "z", "logits"
    """
    P = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    beta = dtype(beta)
    pixels = np.asarray(pixels)
    b = pixels.shape[0]
    L = P["enc3.W"].shape[0] // 2
    x = pixels.astype(dtype) / dtype(255)
    y = onehot(labels, dtype)
    eps = np.asarray(eps, dtype=dtype).reshape(b, L)

    # ---- forward
    a0 = np.concatenate([x, y], axis=1)
    p1 = a0 @ P["enc1.W"].T + P["enc1.b"]
    h1 = act_forward(p1, act)
    p2 = h1 @ P["enc2.W"].T + P["enc2.b"]
    h2 = act_forward(p2, act)
    o = h2 @ P["enc3.W"].T + P["enc3.b"]
    mu, logvar = o[:, :L], o[:, L:]
    std = np.exp(logvar / 2)
    z = mu + eps * std
    d0 = np.concatenate([z, y], axis=1)
    q1 = d0 @ P["dec1.W"].T + P["dec1.b"]
    g1 = act_forward(q1, act)
    q2 = g1 @ P["dec2.W"].T + P["dec2.b"]
    g2 = act_forward(q2, act)
    logits = g2 @ P["dec3.W"].T + P["dec3.b"]

    rec_i = (np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits)))).sum(axis=1)
    kl_i = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(axis=1)
    loss_i = rec_i + beta * kl_i
    loss, rec, kl = float(loss_i.mean()), float(rec_i.mean()), float(kl_i.mean())

    # ---- backward (of the batch MEAN), each layer mirrors its forward line
    inv_b = dtype(1) / dtype(b)
    grads = {}
    sigmoid = 1 / (1 + np.exp(-logits))
    d_logits = (sigmoid - x) * inv_b                      # d rec / d logits
    grads["dec3.W"] = d_logits.T @ g2
    grads["dec3.b"] = d_logits.sum(axis=0)
    d_q2 = act_backward(d_logits @ P["dec3.W"], q2, act)
    grads["dec2.W"] = d_q2.T @ g1
    grads["dec2.b"] = d_q2.sum(axis=0)
    d_q1 = act_backward(d_q2 @ P["dec2.W"], q1, act)
    grads["dec1.W"] = d_q1.T @ d0
    grads["dec1.b"] = d_q1.sum(axis=0)
    d_z = (d_q1 @ P["dec1.W"])[:, :L]                     # the onehot part has no gradient
    # z = mu + eps * exp(logvar/2);  d kl/d mu = mu;  d kl/d logvar = (exp(logvar) - 1)/2
    d_mu = d_z + beta * mu * inv_b
    d_logvar = d_z * eps * std / 2 + beta * (np.exp(logvar) - 1) / 2 * inv_b
    d_o = np.concatenate([d_mu, d_logvar], axis=1)
    grads["enc3.W"] = d_o.T @ h2
    grads["enc3.b"] = d_o.sum(axis=0)
    d_p2 = act_backward(d_o @ P["enc3.W"], p2, act)
    grads["enc2.W"] = d_p2.T @ h1
    grads["enc2.b"] = d_p2.sum(axis=0)
    d_p1 = act_backward(d_p2 @ P["enc2.W"], p1, act)
    grads["enc1.W"] = d_p1.T @ a0
    grads["enc1.b"] = d_p1.sum(axis=0)

    acts = {"enc1": h1, "enc2": h2, "dec1": g1, "dec2": g2,
            "mu": mu, "logvar": logvar, "z": z, "logits": logits}
    act_grads = {"enc1": d_p1, "enc2": d_p2, "dec1": d_q1, "dec2": d_q2,
                 "mu": d_mu, "logvar": d_logvar, "z": d_z, "logits": d_logits}
    return loss, rec, kl, grads, acts, act_grads


def loss_only(params, pixels, labels, eps, beta, act):
    return forward_backward(params, pixels, labels, eps, beta, act)[0]


# --------------------------------------------------------------------------- Adam

def adam(params, grads, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One PyTorch-style Adam step; returns new (params, m, v, t) as float64 dicts."""
    t = t + 1
    new_p, new_m, new_v = {}, {}, {}
    bias1 = 1 - beta1**t
    bias2 = 1 - beta2**t
    for k in params:
        g = np.asarray(grads[k], dtype=np.float64)
        new_m[k] = beta1 * np.asarray(m[k], dtype=np.float64) + (1 - beta1) * g
        new_v[k] = beta2 * np.asarray(v[k], dtype=np.float64) + (1 - beta2) * g * g
        denom = np.sqrt(new_v[k]) / np.sqrt(bias2) + eps
        new_p[k] = np.asarray(params[k], dtype=np.float64) - lr / bias1 * new_m[k] / denom
    return new_p, new_m, new_v, t


# --------------------------------------------------------------------------- test data

def init_params(h1, h2, latent, seed=0, scale=1.0):
    """Small random float64 parameters (for testing the reference on its own)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "enc1": (h1, X_DIM + N_CLASSES), "enc2": (h2, h1), "enc3": (2 * latent, h2),
        "dec1": (h2, latent + N_CLASSES), "dec2": (h1, h2), "dec3": (X_DIM, h1),
    }
    params = {}
    for layer, (fan_out, fan_in) in shapes.items():
        params[f"{layer}.W"] = rng.normal(0, scale / np.sqrt(fan_in), (fan_out, fan_in))
        params[f"{layer}.b"] = rng.normal(0, 0.1 * scale, fan_out)
    return params


def digit_like_pixels(b, seed=0):
    """(b, 784) uint8 images that look like MNIST: mostly 0, a few thick bright strokes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    out = np.zeros((b, 28, 28))
    for i in range(b):
        img = np.zeros((28, 28))
        for _ in range(rng.integers(2, 5)):
            (x0, y0), (x1, y1) = rng.uniform(5, 23, size=(2, 2))
            # distance from every pixel to the segment (x0,y0)-(x1,y1)
            dx, dy = x1 - x0, y1 - y0
            s = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
            dist = np.hypot(xx - (x0 + s * dx), yy - (y0 + s * dy))
            img = np.maximum(img, np.clip(2.2 - dist, 0, 1))
        out[i] = img
    return np.round(out.reshape(b, X_DIM) * 255).astype(np.uint8)


def random_labels(b, seed=0):
    return np.random.default_rng(seed + 1).integers(0, N_CLASSES, b).astype(np.uint8)


# --------------------------------------------------------------------------- comparison helper

def mismatch(name, got, ref, rtol=1e-4, atol_scale=1e-5):
    """None if got ~= ref, else a one-line diagnosis.

    Entry-wise test |got - ref| <= rtol*|ref| + atol_scale*max|ref| (+1e-12), i.e. the
    absolute floor is scaled to the tensor's own magnitude.
    """
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return f"{name}: shape {got.shape}, reference {ref.shape}"
    if not np.all(np.isfinite(got)):
        return f"{name}: {int((~np.isfinite(got)).sum())} non-finite entries"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = np.abs(got - ref)
    tol = rtol * np.abs(ref) + atol_scale * scale + 1e-12
    bad = err > tol
    if not bad.any():
        return None
    i = np.unravel_index(np.argmax(err / tol), err.shape)
    fit = float((got * ref).sum() / (ref * ref).sum()) if scale > 0 else float("nan")
    return (f"{name}: {int(bad.sum())}/{bad.size} entries off; worst at {tuple(int(j) for j in i)}: "
            f"got {got[i]:.7g}, ref {ref[i]:.7g} ({err[i] / tol[i]:.1f}x tol); "
            f"max|err| = {err.max():.3g} = {err.max() / max(scale, 1e-300):.2e} * max|ref| "
            f"(max|ref| = {scale:.3g}); least squares got ~ {fit:.5g} * ref")


# --------------------------------------------------------------------------- the references vs finite differences

def reference_fd_mismatches(loss_of, params, eps, grads, d_eps, names, h=1e-6, seed=7):
    """Central differences (float64) of a reference's loss against its analytic gradients:
    four random entries of each parameter tensor in names, then four of eps, whose analytic
    gradient d_eps is d loss / d z * std (which checks the "z" activation gradient).
    loss_of(params, eps) -> loss. Returns the failures as lines."""
    rng = np.random.default_rng(seed)
    bad = []
    for k in names:
        scale = np.abs(grads[k]).max()
        for _ in range(4):
            idx = tuple(int(rng.integers(0, s)) for s in params[k].shape)
            q = {kk: v.copy() for kk, v in params.items()}
            q[k][idx] += h
            lp = loss_of(q, eps)
            q[k][idx] -= 2 * h
            lm = loss_of(q, eps)
            fd = (lp - lm) / (2 * h)
            if not abs(fd - grads[k][idx]) <= 1e-5 * abs(fd) + 1e-6 * scale + 1e-8:
                bad.append(f"{k}{idx}: analytic {grads[k][idx]:.9g}, fd {fd:.9g}")
    for _ in range(4):
        idx = tuple(int(rng.integers(0, s)) for s in eps.shape)
        e = eps.copy()
        e[idx] += h
        lp = loss_of(params, e)
        e[idx] -= 2 * h
        lm = loss_of(params, e)
        fd = (lp - lm) / (2 * h)
        if not abs(fd - d_eps[idx]) <= 1e-5 * abs(fd) + 1e-8:
            bad.append(f"eps{idx}: analytic {d_eps[idx]:.9g}, fd {fd:.9g}")
    return bad


# --------------------------------------------------------------------------- kernels vs their own loss

def kernel_fd_mismatches(model, loss_of, names, noise, seed=1):
    """Central differences of a kernel model's float32 loss against its stored gradients:
    for each parameter tensor, its 3 largest-gradient entries (steps of ±1e-2) and a random
    direction (±0.05); loss_of() runs one forward/backward and returns the loss; noise is the
    loss's rounding noise. Parameters are restored. Returns the failures as lines."""
    g = {k: np.array(v, dtype=np.float64) for k, v in model.grads.items()}
    base = {k: np.array(v) for k, v in model.params.items()}
    rng = np.random.default_rng(seed)
    bad = []

    def loss_at(k, value):
        model.params[k][...] = value
        stored = np.array(model.params[k], dtype=np.float64)
        loss = loss_of()
        model.params[k][...] = base[k]
        return loss, stored

    for k in names:
        p0 = base[k].astype(np.float64)
        for flat in np.argsort(-np.abs(g[k]).ravel())[:3]:
            idx = np.unravel_index(flat, p0.shape)
            hi, lo = p0.copy(), p0.copy()
            hi[idx] += 1e-2
            lo[idx] -= 1e-2
            (lp, hi32), (lm, lo32) = loss_at(k, hi), loss_at(k, lo)
            delta = hi32[idx] - lo32[idx]
            fd = (lp - lm) / delta
            tol = 2e-2 * abs(g[k][idx]) + noise / delta
            if not abs(fd - g[k][idx]) <= tol:
                bad.append(f"{k}{tuple(int(i) for i in idx)}: kernel {g[k][idx]:.6g}, "
                           f"fd {fd:.6g} (tol {tol:.2g})")
        u = rng.choice([-1.0, 1.0], size=p0.shape)
        u /= np.linalg.norm(u)
        (lp, hi32), (lm, lo32) = loss_at(k, p0 + 0.05 * u), loss_at(k, p0 - 0.05 * u)
        predicted = float((g[k] * (hi32 - lo32)).sum())
        tol = 2e-2 * np.linalg.norm(g[k]) * np.linalg.norm(hi32 - lo32) + noise
        if not abs((lp - lm) - predicted) <= tol:
            bad.append(f"{k} random direction: predicted {predicted:.6g}, measured {lp - lm:.6g}")
    return bad


# --------------------------------------------------------------------------- the digit classifier

CLASSIFIER_LAYERS = ("fc1", "fc2", "fc3")
CLASSIFIER_PARAMS = tuple(f"{layer}.{kind}" for layer in CLASSIFIER_LAYERS for kind in ("W", "b"))


def classifier_forward_backward(params, pixels, labels, act):
    """The classifier's batch-mean softmax cross-entropy and its gradients, float64:

        h1 = act(x @ W1.T + b1);  h2 = act(h1 @ W2.T + b2);  logits = h2 @ W3.T + b3
        loss = mean over images of logsumexp(logits) - logits[label]

    Returns (loss, grads, acts) with acts = {"fc1", "fc2", "logits"} (post-activation).
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    b = pixels.shape[0]
    x = pixels.astype(np.float64) / 255.0
    pre1 = x @ p["fc1.W"].T + p["fc1.b"]
    h1 = act_forward(pre1, act)
    pre2 = h1 @ p["fc2.W"].T + p["fc2.b"]
    h2 = act_forward(pre2, act)
    logits = h2 @ p["fc3.W"].T + p["fc3.b"]
    shift = logits.max(axis=1, keepdims=True)
    log_z = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
    y = onehot(labels)
    loss = float(np.mean(log_z - (logits * y).sum(axis=1)))

    d_logits = (np.exp(logits - log_z[:, None]) - y) / b
    grads = {"fc3.W": d_logits.T @ h2, "fc3.b": d_logits.sum(axis=0)}
    d_pre2 = act_backward(d_logits @ p["fc3.W"], pre2, act)
    grads["fc2.W"], grads["fc2.b"] = d_pre2.T @ h1, d_pre2.sum(axis=0)
    d_pre1 = act_backward(d_pre2 @ p["fc2.W"], pre1, act)
    grads["fc1.W"], grads["fc1.b"] = d_pre1.T @ x, d_pre1.sum(axis=0)
    return loss, grads, {"fc1": h1, "fc2": h2, "logits": logits}


def classifier_init_params(h1, h2, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for layer, (fan_out, fan_in) in {"fc1": (h1, X_DIM), "fc2": (h2, h1),
                                     "fc3": (N_CLASSES, h2)}.items():
        params[f"{layer}.W"] = rng.normal(0, 1 / np.sqrt(fan_in), (fan_out, fan_in))
        params[f"{layer}.b"] = rng.normal(0, 0.1, fan_out)
    return params


# --------------------------------------------------------------------------- the flow prior

def flow_param_names(blocks):
    layers = ["in"] + [f"res{k}{ab}" for k in range(1, blocks + 1) for ab in "ab"] + ["out"]
    return tuple(f"{layer}.{kind}" for layer in layers for kind in ("W", "b"))


def flow_condition(t, labels, n_freq, n_classes=N_CLASSES):
    """[sin(2^i t), cos(2^i t) for i < n_freq ; onehot(label) over n_classes + 1 (null last)]."""
    t = np.asarray(t, dtype=np.float64)
    wt = t[:, None] * 2.0 ** np.arange(n_freq)[None, :]
    time = np.empty((len(t), 2 * n_freq))
    time[:, 0::2], time[:, 1::2] = np.sin(wt), np.cos(wt)
    y = np.zeros((len(t), n_classes + 1))
    y[np.arange(len(t)), np.asarray(labels).astype(np.int64)] = 1
    return np.concatenate([time, y], axis=1)


def flow_forward_backward(params, z, t, labels, target, act, n_freq, n_classes=N_CLASSES):
    """The velocity network's loss and gradients, float64:

        c = [time features of t ; onehot(label)]
        h_0 = [z ; c] @ W_in.T + b_in
        h_k = h_{k-1} + act([h_{k-1} ; c] @ W_ka.T + b_ka) @ W_kb.T + b_kb
        v = h_K @ W_out.T + b_out
        loss = mean over the batch of mean over the latent of (v - target)²

    Returns (loss, grads, v)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    blocks = sum(1 for k in p if k.endswith("a.W"))
    z = np.asarray(z, dtype=np.float64)
    b, L = z.shape
    c = flow_condition(t, labels, n_freq, n_classes)
    x = np.concatenate([z, c], axis=1)
    h = x @ p["in.W"].T + p["in.b"]
    inputs, pres, outs = [], [], []
    for k in range(1, blocks + 1):
        s = np.concatenate([h, c], axis=1)
        pre = s @ p[f"res{k}a.W"].T + p[f"res{k}a.b"]
        a = act_forward(pre, act)
        inputs.append(s)
        pres.append(pre)
        outs.append(a)
        h = h + a @ p[f"res{k}b.W"].T + p[f"res{k}b.b"]
    v = h @ p["out.W"].T + p["out.b"]
    d = v - np.asarray(target, dtype=np.float64)
    loss = float(np.mean(d * d))

    dv = 2 * d / (b * L)
    grads = {"out.W": dv.T @ h, "out.b": dv.sum(axis=0)}
    dh = dv @ p["out.W"]
    for k in range(blocks, 0, -1):
        s, pre, a = inputs[k - 1], pres[k - 1], outs[k - 1]
        grads[f"res{k}b.W"], grads[f"res{k}b.b"] = dh.T @ a, dh.sum(axis=0)
        dpre = act_backward(dh @ p[f"res{k}b.W"], pre, act)
        grads[f"res{k}a.W"], grads[f"res{k}a.b"] = dpre.T @ s, dpre.sum(axis=0)
        dh = dh + (dpre @ p[f"res{k}a.W"])[:, :h.shape[1]]
    grads["in.W"], grads["in.b"] = dh.T @ x, dh.sum(axis=0)
    return loss, grads, v


def flow_init_params(latent, hidden, blocks, n_freq, seed=0, n_classes=N_CLASSES):
    rng = np.random.default_rng(seed)
    c = 2 * n_freq + n_classes + 1
    shapes = {"in": (hidden, latent + c), "out": (latent, hidden)}
    for k in range(1, blocks + 1):
        shapes[f"res{k}a"], shapes[f"res{k}b"] = (hidden, hidden + c), (hidden, hidden)
    params = {}
    for layer, (fan_out, fan_in) in shapes.items():
        params[f"{layer}.W"] = rng.normal(0, 1 / np.sqrt(fan_in), (fan_out, fan_in))
        params[f"{layer}.b"] = rng.normal(0, 0.1, fan_out)
    return params


# --------------------------------------------------------------------------- the convolutional CVAE
#
# Per image (issue 17): x (1, 28, 28) = pixels / 255
#   h1 = act(conv2d(x, conv1))                      (C1, 14, 14)   4x4, stride 2, padding 1
#   h2 = act(conv2d(h1, conv2))                     (C2, 7, 7)
#   h3 = act([flatten(h2) ; onehot(y)] @ enc_fc.W.T + b)
#   o  = h3 @ enc_out.W.T + b;  mu, logvar;  z = mu + eps * exp(logvar / 2)
#   g1 = act([z ; onehot(y)] @ dec_fc1.W.T + b)
#   g2 = act(g1 @ dec_fc2.W.T + b) as (C2, 7, 7)
#   g3 = act(conv_transpose2d(g2, tconv1))          (C1, 14, 14)
#   logits = conv_transpose2d(g3, tconv2)           (1, 28, 28) -> 784
# Weights are given as the kernels store them: conv (C_out, C_in*16) = PyTorch's
# (C_out, C_in, 4, 4); transposed conv (C_in, C_out*16) = ConvTranspose2d's (C_in, C_out, 4, 4).

CONV_LAYERS = ("conv1", "conv2", "enc_fc", "enc_out", "dec_fc1", "dec_fc2", "tconv1", "tconv2")
CONV_PARAM_NAMES = tuple(f"{layer}.{kind}" for layer in CONV_LAYERS for kind in ("W", "b"))
CONV_ACT_NAMES = ("conv1", "conv2", "enc_fc", "dec_fc1", "dec_fc2", "tconv1", "mu", "logvar",
                  "z", "logits")


def im2col(x):
    """(b, C, H, W) -> (b, C*16, H/2 * W/2): row (c, ky, kx), column (oy, ox) holds
    x[c, 2oy - 1 + ky, 2ox - 1 + kx] (zero outside the image)."""
    b, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((b, c, 4, 4, ho, wo), dtype=x.dtype)
    for ky in range(4):
        for kx in range(4):
            cols[:, :, ky, kx] = xp[:, :, ky:ky + 2 * ho:2, kx:kx + 2 * wo:2]
    return cols.reshape(b, c * 16, ho * wo)


def col2im(cols, c, h, w):
    """The adjoint of im2col: (b, c*16, h/2 * w/2) -> (b, c, h, w), overlapping taps summed."""
    b = cols.shape[0]
    ho, wo = h // 2, w // 2
    cols = cols.reshape(b, c, 4, 4, ho, wo)
    xp = np.zeros((b, c, h + 2, w + 2), dtype=cols.dtype)
    for ky in range(4):
        for kx in range(4):
            xp[:, :, ky:ky + 2 * ho:2, kx:kx + 2 * wo:2] += cols[:, :, ky, kx]
    return xp[:, :, 1:-1, 1:-1]


def conv2d(x, weight, bias):
    """4x4, stride 2, padding 1; weight (C_out, C_in*16)."""
    b, _, h, w = x.shape
    y = np.einsum("ok,bkp->bop", weight, im2col(x)) + bias[None, :, None]
    return y.reshape(b, weight.shape[0], h // 2, w // 2)


def conv_transpose2d(x, weight, bias):
    """The transposed convolution of conv2d's geometry: (b, C_in, h, w) -> (b, C_out, 2h, 2w);
    weight (C_in, C_out*16)."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[1] // 16
    cols = np.einsum("ik,bip->bkp", weight, x.reshape(b, c_in, h * w))
    return col2im(cols, c_out, 2 * h, 2 * w) + bias[None, :, None, None]


def conv2d_direct(x, weight, bias):
    """conv2d by its definition, loop by loop (checks im2col in the tests)."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[0]
    k = weight.reshape(c_out, c_in, 4, 4)
    y = np.zeros((b, c_out, h // 2, w // 2)) + bias[None, :, None, None]
    for oy in range(h // 2):
        for ox in range(w // 2):
            for ky in range(4):
                for kx in range(4):
                    iy, ix = 2 * oy - 1 + ky, 2 * ox - 1 + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        y[:, :, oy, ox] += x[:, :, iy, ix] @ k[:, :, ky, kx].T
    return y


def conv_transpose2d_direct(x, weight, bias):
    """conv_transpose2d by its definition (PyTorch's): every input pixel scatters its kernel."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[1] // 16
    k = weight.reshape(c_in, c_out, 4, 4)
    yp = np.zeros((b, c_out, 2 * h + 2, 2 * w + 2))
    for iy in range(h):
        for ix in range(w):
            for ky in range(4):
                for kx in range(4):
                    yp[:, :, 2 * iy + ky, 2 * ix + kx] += x[:, :, iy, ix] @ k[:, :, ky, kx]
    return yp[:, :, 1:-1, 1:-1] + bias[None, :, None, None]


def conv_forward_backward(params, pixels, labels, eps, beta, act, dtype=np.float64):
    """forward_backward of the convolutional CVAE: (loss, rec, kl, grads, acts, act_grads)
    with acts and act_grads keyed by CONV_ACT_NAMES, (batch, features) with a map flattened as
    (C, H, W); act_grads are w.r.t. pre-activations (and mu, logvar, z, logits)."""
    P = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    pixels = np.asarray(pixels)
    b = pixels.shape[0]
    L = P["enc_out.W"].shape[0] // 2
    c1, c2 = P["conv1.W"].shape[0], P["conv2.W"].shape[0]
    x = (pixels.astype(dtype) / dtype(255)).reshape(b, 1, 28, 28)
    y = onehot(labels, dtype)
    eps = np.asarray(eps, dtype=dtype).reshape(b, L)

    # ---- forward
    p1 = conv2d(x, P["conv1.W"], P["conv1.b"])
    h1 = act_forward(p1, act)
    p2 = conv2d(h1, P["conv2.W"], P["conv2.b"])
    h2 = act_forward(p2, act)
    a = np.concatenate([h2.reshape(b, -1), y], axis=1)
    p3 = a @ P["enc_fc.W"].T + P["enc_fc.b"]
    h3 = act_forward(p3, act)
    o = h3 @ P["enc_out.W"].T + P["enc_out.b"]
    mu, logvar = o[:, :L], o[:, L:]
    std = np.exp(logvar / 2)
    z = mu + eps * std
    d0 = np.concatenate([z, y], axis=1)
    q1 = d0 @ P["dec_fc1.W"].T + P["dec_fc1.b"]
    g1 = act_forward(q1, act)
    q2 = g1 @ P["dec_fc2.W"].T + P["dec_fc2.b"]
    g2 = act_forward(q2, act)
    q3 = conv_transpose2d(g2.reshape(b, c2, 7, 7), P["tconv1.W"], P["tconv1.b"])
    g3 = act_forward(q3, act)
    logits = conv_transpose2d(g3, P["tconv2.W"], P["tconv2.b"]).reshape(b, 784)
    xf = x.reshape(b, 784)

    rec_i = (np.maximum(logits, 0) - logits * xf + np.log1p(np.exp(-np.abs(logits)))).sum(axis=1)
    kl_i = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(axis=1)
    loss_i = rec_i + beta * kl_i
    loss, rec, kl = float(loss_i.mean()), float(rec_i.mean()), float(kl_i.mean())

    # ---- backward of the batch mean
    inv_b = dtype(1) / dtype(b)
    grads = {}
    d_logits = (1 / (1 + np.exp(-logits)) - xf) * inv_b
    # transposed conv: y = col2im(W^T x)  =>  dx = W im2col(dy), dW = x im2col(dy)^T
    dcols = im2col(d_logits.reshape(b, 1, 28, 28))
    g3f = g3.reshape(b, c1, 196)
    grads["tconv2.W"] = np.einsum("bip,bkp->ik", g3f, dcols)
    grads["tconv2.b"] = d_logits.sum(axis=(0, 1))[None]
    d_q3 = act_backward(np.einsum("ik,bkp->bip", P["tconv2.W"], dcols).reshape(q3.shape), q3, act)
    dcols = im2col(d_q3)
    g2f = g2.reshape(b, c2, 49)
    grads["tconv1.W"] = np.einsum("bip,bkp->ik", g2f, dcols)
    grads["tconv1.b"] = d_q3.sum(axis=(0, 2, 3))
    d_q2 = act_backward(np.einsum("ik,bkp->bip", P["tconv1.W"], dcols).reshape(b, -1), q2, act)
    grads["dec_fc2.W"] = d_q2.T @ g1
    grads["dec_fc2.b"] = d_q2.sum(axis=0)
    d_q1 = act_backward(d_q2 @ P["dec_fc2.W"], q1, act)
    grads["dec_fc1.W"] = d_q1.T @ d0
    grads["dec_fc1.b"] = d_q1.sum(axis=0)
    d_z = (d_q1 @ P["dec_fc1.W"])[:, :L]
    d_mu = d_z + beta * mu * inv_b
    d_logvar = d_z * eps * std / 2 + beta * (np.exp(logvar) - 1) / 2 * inv_b
    d_o = np.concatenate([d_mu, d_logvar], axis=1)
    grads["enc_out.W"] = d_o.T @ h3
    grads["enc_out.b"] = d_o.sum(axis=0)
    d_p3 = act_backward(d_o @ P["enc_out.W"], p3, act)
    grads["enc_fc.W"] = d_p3.T @ a
    grads["enc_fc.b"] = d_p3.sum(axis=0)
    d_p2 = act_backward((d_p3 @ P["enc_fc.W"])[:, :c2 * 49].reshape(p2.shape), p2, act)
    # conv: y = W im2col(x)  =>  dW = dy im2col(x)^T, dx = col2im(W^T dy)
    d_p2f = d_p2.reshape(b, c2, 49)
    grads["conv2.W"] = np.einsum("bop,bkp->ok", d_p2f, im2col(h1))
    grads["conv2.b"] = d_p2f.sum(axis=(0, 2))
    d_p1 = act_backward(col2im(np.einsum("ok,bop->bkp", P["conv2.W"], d_p2f), c1, 14, 14), p1,
                        act)
    d_p1f = d_p1.reshape(b, c1, 196)
    grads["conv1.W"] = np.einsum("bop,bkp->ok", d_p1f, im2col(x))
    grads["conv1.b"] = d_p1f.sum(axis=(0, 2))

    flat = lambda t: t.reshape(b, -1)  # noqa: E731
    acts = {"conv1": flat(h1), "conv2": flat(h2), "enc_fc": h3, "dec_fc1": g1, "dec_fc2": g2,
            "tconv1": flat(g3), "mu": mu, "logvar": logvar, "z": z, "logits": logits}
    act_grads = {"conv1": flat(d_p1), "conv2": flat(d_p2), "enc_fc": d_p3, "dec_fc1": d_q1,
                 "dec_fc2": d_q2, "tconv1": flat(d_q3), "mu": d_mu, "logvar": d_logvar,
                 "z": d_z, "logits": d_logits}
    return loss, rec, kl, grads, acts, act_grads


def conv_loss_only(params, pixels, labels, eps, beta, act):
    return conv_forward_backward(params, pixels, labels, eps, beta, act)[0]


def conv_init_params(channels, hidden, latent, seed=0, scale=1.0):
    """Small random float64 parameters of the convolutional CVAE (kernel storage shapes)."""
    c1, c2 = channels
    rng = np.random.default_rng(seed)
    shapes = {"conv1": ((c1, 16), c1), "conv2": ((c2, 16 * c1), c2),
              "enc_fc": ((hidden, 49 * c2 + N_CLASSES), hidden),
              "enc_out": ((2 * latent, hidden), 2 * latent),
              "dec_fc1": ((hidden, latent + N_CLASSES), hidden),
              "dec_fc2": ((49 * c2, hidden), 49 * c2),
              "tconv1": ((c2, 16 * c1), c1), "tconv2": ((c1, 16), 1)}
    params = {}
    for layer, ((rows, fan_in), n_bias) in shapes.items():
        params[f"{layer}.W"] = rng.normal(0, scale / np.sqrt(fan_in), (rows, fan_in))
        params[f"{layer}.b"] = rng.normal(0, 0.1 * scale, n_bias)
    return params
