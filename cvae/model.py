"""The CVAE's architecture and its slab: one float32 allocation carved into named views.

Layout (every section 64-byte aligned): parameters, their gradients, Adam's first and second
moments (each group contiguous and in the same order, so a checkpoint or an optimizer pass
sees one block per group), then every activation and activation-gradient buffer for the
largest batch, per-sample loss terms and per-thread scratch. The kernels get pointers into it
once (cvae._kernels.Net); a training step allocates nothing.

In bf16 precision the slab also holds each weight's two bf16 copies (``bf16.<layer>.W``, the
rows rounded to bf16, and ``bf16.<layer>.Wp``, pairs of rows interleaved for dX, which the
first layer has not; both written by the fused Adam loop, and by ``sync_bf16`` after
initialisation or loading) and three scratch areas where the GEMMs pack their other operands
as bf16 pairs. Sizes there are in floats: two bf16 values per float.

Storage follows the kernels: a weight is [out][in padded to 16]; activations are
feature-major [features padded to 16][batch padded to 16]. The views in ``params``,
``grads``, ``acts``, ... hide both paddings.

The convolutional CVAE (ConvArch) uses the same slab: a convolution's weight is PyTorch's
(C_out, C_in, 4, 4) stored as [C_out][C_in*16], a transposed convolution's is
ConvTranspose2d's (C_in, C_out, 4, 4) as [C_in][C_out*16] with its bias per output channel;
an image map of C channels is feature-major [C*H*W][batch], and each convolution's im2col
lives in the activation area (``act.col1``, ``act.col2``: the weight gradients read them) or
in ``scratch.col``.
"""

from dataclasses import dataclass

import numpy as np

from cvae.checkpoint import header_int, load_checkpoint, register_kind_check
from cvae.data import NUM_DIGITS as N_CLASSES
from cvae.data import PIXELS_PER_IMAGE as N_PIXELS
from cvae.errors import CvaeError
from cvae.kernels import kernels

PRECISIONS = ("fp32", "bf16")

ALIGN = 16  # floats: 64 bytes

VARIANTS = {
    "mini": dict(h1=256, h2=128, latent=32, digits=(0, 1)),
    "mid": dict(h1=512, h2=256, latent=64, digits=(0, 1)),
    "full": dict(h1=640, h2=320, latent=128, digits=tuple(range(10))),
    "conv": dict(channels=(32, 64), hidden=512, latent=128, digits=tuple(range(10))),
}
CONV_VARIANTS = ("conv",)
ACTIVATIONS = ("elu", "relu")
# Bounds on what any network's slab may be built with, far above anything cvae trains (the
# widest layer of `full` is 794 inputs, batches are at most the 60,000 training images) and
# checked before the slab is allocated, so a hostile or damaged header cannot ask for
# terabytes. A checkpoint's own sizes are further bound by its file: its sections must match.
MAX_WIDTH = 1 << 15
MAX_BATCH = 1 << 16
# A convolution's channels: its im2col buffers grow with channels x positions x batch (at
# 256 channels and a batch of 64, 50 MB each), not with anything a checkpoint must hold, so
# they get a bound of their own.
MAX_CHANNELS = 256
# ... and its batches, so that every offset into its buffers fits the kernels' ints.
MAX_CONV_BATCH = 4096
# And the whole slab: a conv model's buffers grow with channels x batch, which its weights do
# not bound, so a tiny hostile checkpoint (256 channels, 1 hidden unit, batch 4096) could ask
# for 13 GB that numpy would hand out lazily and the first step would be killed for. 4 GB is
# 30 times the largest slab cvae trains (conv at batch 256: 0.13 GB).
MAX_SLAB_FLOATS = 1 << 30


def pad(n):
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Arch:
    h1: int
    h2: int
    latent: int
    act: str = "elu"
    x_dim: int = N_PIXELS
    n_classes: int = N_CLASSES

    @classmethod
    def variant(cls, name, act="elu", hidden=None, latent=None):
        """The variant's sizes, overridden by hidden (h1, h2) and latent when given (an MLP
        variant; arch_for_variant takes conv too)."""
        if name in CONV_VARIANTS:
            raise CvaeError(f"variant {name!r} is convolutional: use arch_for_variant")
        v = VARIANTS[name]
        h1, h2 = hidden or (v["h1"], v["h2"])
        return cls(h1=h1, h2=h2, latent=latent or v["latent"], act=act or "elu")

    def layers(self):
        """(name, n_in, n_out) of the six linear layers, encoder then decoder."""
        x, c, h1, h2, z = self.x_dim, self.n_classes, self.h1, self.h2, self.latent
        return (("enc1", x + c, h1), ("enc2", h1, h2), ("enc3", h2, 2 * z),
                ("dec1", z + c, h2), ("dec2", h2, h1), ("dec3", h1, x))

    def n_params(self):
        return sum(n_out * (n_in + 1) for _, n_in, n_out in self.layers())

    def to_json(self):
        return dict(h1=self.h1, h2=self.h2, latent=self.latent, act=self.act)

    def describe(self):
        return f"{self.h1}-{self.h2}-{self.latent} {self.act}"


# The convolutions' geometry: 4x4 kernels, stride 2, padding 1, 28 -> 14 -> 7 (the kernels
# hard-code it too, cvae._kernels.ConvNet).
CONV_SIDE = (28, 14, 7)


@dataclass(frozen=True)
class ConvArch:
    """The convolutional CVAE (issue 17): conv 1 -> C1 (28 -> 14), conv C1 -> C2 (14 -> 7),
    [flatten ; onehot] -> fc H -> fc 2L; [z ; onehot] -> fc H -> fc C2*49 -> transposed conv
    C2 -> C1 (7 -> 14) -> transposed conv C1 -> 1 (14 -> 28) -> 784 logits; act after every
    layer but the two outputs."""
    channels: tuple = (32, 64)
    hidden: int = 512
    latent: int = 128
    act: str = "elu"
    x_dim: int = N_PIXELS
    n_classes: int = N_CLASSES

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))

    def layers(self):
        """(name, n_in, n_out, n_bias) of the eight weight layers, encoder then decoder: each
        weight is [n_out][n_in] (module doc), its bias n_bias long."""
        (c1, c2), h, z, c = self.channels, self.hidden, self.latent, self.n_classes
        flat = c2 * CONV_SIDE[2] ** 2
        return (("conv1", 16, c1, c1), ("conv2", 16 * c1, c2, c2),
                ("enc_fc", flat + c, h, h), ("enc_out", h, 2 * z, 2 * z),
                ("dec_fc1", z + c, h, h), ("dec_fc2", h, flat, flat),
                ("tconv1", 16 * c1, c2, c1), ("tconv2", 16, c1, 1))

    def positions(self):
        """Per sample, the columns of each convolution's GEMMs (its small map's positions)."""
        small, tiny = CONV_SIDE[1] ** 2, CONV_SIDE[2] ** 2
        return {"conv1": small, "conv2": tiny, "tconv1": tiny, "tconv2": small}

    def n_params(self):
        return sum(n_out * n_in + n_bias for _, n_in, n_out, n_bias in self.layers())

    def to_json(self):
        return {"type": "conv", "channels": list(self.channels), "hidden": self.hidden,
                "latent": self.latent, "act": self.act}

    def describe(self):
        c1, c2 = self.channels
        return f"conv {c1}-{c2}-{self.hidden}-{self.latent} {self.act}"


def arch_for_variant(name, act="elu", hidden=None, latent=None, channels=None):
    """The variant's architecture (Arch, or ConvArch for conv) with the given overrides:
    hidden is (h1, h2) for the MLP variants and one int for conv; channels (C1, C2) is conv's
    only."""
    if name not in VARIANTS:
        raise CvaeError(f"variant {name!r}: choose from {', '.join(VARIANTS)}")
    if name not in CONV_VARIANTS:
        if channels is not None:
            raise CvaeError(f"--channels applies to the convolutional variants only, not "
                            f"{name!r}")
        return Arch.variant(name, act=act, hidden=hidden, latent=latent)
    v = VARIANTS[name]
    return ConvArch(channels=tuple(channels or v["channels"]), hidden=hidden or v["hidden"],
                    latent=latent or v["latent"], act=act or "elu")


def _layer(layer):
    """(name, n_in, n_out, n_bias) of a layer tuple; an MLP's (name, n_in, n_out) has a bias
    per output."""
    return tuple(layer) if len(layer) == 4 else (*layer, layer[2])


# Activation buffers: name -> rows, for the feature-major [rows][batch] layout.
def _activation_rows(arch):
    x, c, z = arch.x_dim, arch.n_classes, arch.latent
    if isinstance(arch, ConvArch):
        (c1, c2), h = arch.channels, arch.hidden
        small, tiny = CONV_SIDE[1] ** 2, CONV_SIDE[2] ** 2
        return {"x": x, "col1": 16 * small, "conv1": c1 * small, "col2": 16 * c1 * tiny,
                "conv2": c2 * tiny + c, "enc_fc": h, "enc_out": 2 * z, "eps": z,
                "dec_in": z + c, "dec_fc1": h, "dec_fc2": c2 * tiny, "tconv1": c1 * small,
                "tconv2": x}
    return {"x": x + c, "enc1": arch.h1, "enc2": arch.h2, "enc3": 2 * z, "eps": z,
            "dec_in": z + c, "dec1": arch.h2, "dec2": arch.h1, "dec3": x}


def check_sizes(layers, max_batch, source):
    """Every layer's widths in [1, MAX_WIDTH] and the batch in [1, MAX_BATCH], else CvaeError."""
    for name, n_in, n_out, _ in map(_layer, layers):
        if not (1 <= n_in <= MAX_WIDTH and 1 <= n_out <= MAX_WIDTH):
            raise CvaeError(f"{source}: layer {name} would be {n_in}x{n_out}, beyond the "
                            f"{MAX_WIDTH} units per layer cvae builds")
    if not 1 <= max_batch <= MAX_BATCH:
        raise CvaeError(f"{source}: a batch of {max_batch} is beyond the {MAX_BATCH} cvae builds")


def check_state_sections(layers, sections, source):
    """A checkpoint's sections against the layers its header declares: every parameter present
    with its layer's shape, Adam's moments all present or all absent, nothing else, and second
    moments non-negative (Adam takes their square root). CvaeError naming source otherwise."""
    shapes = {}
    for name, n_in, n_out, n_bias in map(_layer, layers):
        shapes[f"{name}.W"], shapes[f"{name}.b"] = (n_out, n_in), (n_bias,)
    groups = ("param", "adam_m", "adam_v") if any(k.startswith("adam_") for k in sections) \
        else ("param",)
    expected = {f"{group}.{name}": shape for group in groups for name, shape in shapes.items()}
    for name, shape in expected.items():
        array = sections.get(name)
        if array is None:
            raise CvaeError(f"{source} is damaged: it lacks section {name!r} of the "
                            f"architecture its header declares")
        if tuple(array.shape) != shape:
            raise CvaeError(f"{source} is damaged: section {name!r} is {list(array.shape)}, but "
                            f"the architecture its header declares needs {list(shape)}")
    extra = sorted(set(sections) - set(expected))
    if extra:
        raise CvaeError(f"{source} is damaged: section {extra[0]!r:.60} is not part of the "
                        f"architecture its header declares")
    for name in expected:
        if name.startswith("adam_v.") and (sections[name] < 0).any():
            raise CvaeError(f"{source} is damaged: Adam's second moments in {name!r} are "
                            f"negative")


class SlabModel:
    """One slab for a stack of linear layers: parameters, gradients and Adam moments (each
    group contiguous, layers in order), then the activation buffers, per-sample terms and
    per-thread scratch. Subclasses name the layers and buffers and build their kernel object
    over it (``self.net``); the parameter views, initialisation and checkpoint sections are
    the same for every network."""

    def _carve(self, layers, act_rows, actgrad_names, per_sample, max_batch, threads,
               precision="fp32", positions=None, scratch=None):
        """Lay out the slab; sets slab, layout, section_sizes, params, grads, adam_m, adam_v.

        ``precision``: fp32, or bf16 (GEMM inputs rounded to bf16, see the module's doc);
        resolve "auto" with cvae.kernels.resolve_precision first. ``positions``: layer name
        -> GEMM columns per sample (a convolution's positions; 1 when absent), which size the
        batch-major and bf16 scratch. ``scratch``: further scratch sections, name -> floats."""
        if precision not in PRECISIONS:
            raise CvaeError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        check_sizes(layers, max_batch, "this network")
        positions = positions or {}
        self.layer_dims = tuple(layers)     # as given: (name, n_in, n_out[, n_bias])
        layers = self._layers = tuple(map(_layer, layers))
        self.precision = precision
        self.max_batch = max_batch
        self.threads = threads
        self.max_bp = pad(max_batch)
        k = kernels()
        self.kernel_isa = k.isa
        self.adam_t = 0
        self._last_batch = 0

        offsets, sizes = {}, {}
        total = 0

        def carve(name, n):
            nonlocal total
            offsets[name], sizes[name] = total, n
            total += pad(n)

        for group in ("param", "grad", "adam_m", "adam_v"):
            for name, n_in, n_out, n_bias in layers:
                carve(f"{group}.{name}.W", n_out * pad(n_in))
                carve(f"{group}.{name}.b", n_bias)
        for name, r in act_rows.items():
            carve(f"act.{name}", pad(r) * self.max_bp)
        for name in actgrad_names:
            carve(f"actgrad.{name}", pad(act_rows[name]) * self.max_bp)
        for name in per_sample:
            carve(f"per_sample.{name}", self.max_bp)
        # A GEMM's columns: max_bp, times a convolution's positions.
        cols = {name: positions.get(name, 1) * self.max_bp for name, *_ in layers}
        widest = max(pad(n_in) for _, n_in, _, _ in layers)
        # Batch-major copies: a layer's input (dW's operand), or for a convolution whichever of
        # its input and output is transposed (cvae._kernels.conv_backward_params).
        carve("scratch.batch_major", max(cols[name] * pad(max(n_in, n_out) if name in positions
                                                          else n_in)
                                         for name, n_in, n_out, _ in layers))
        carve("scratch.tiles", threads * k.tile_rows * widest)
        for name, n in (scratch or {}).items():
            carve(name, n)
        if precision == "bf16":
            for index, (name, n_in, n_out, _) in enumerate(layers):
                carve(f"bf16.{name}.W", n_out * pad(n_in) // 2)
                # Wp serves only dX, which the first layer (its input is the data) never has:
                # without it Adam writes 2 bytes less per weight there (enc1: 1 MB a step).
                if index > 0:
                    carve(f"bf16.{name}.Wp", -(-n_out // 2) * pad(n_in))
            # A GEMM's packed operand: at most ceil(rows / 2) pairs of its columns, or half its
            # columns in pairs by a padded row, for rows up to the widest side of its layer.
            packed = max(max(pad(n_in), pad(n_out)) // 2 * cols[name]
                         for name, n_in, n_out, _ in layers)
            carve("scratch.bf16_a", packed)
            carve("scratch.bf16_b", packed)
            # A linear layer's dY rows in bf16 for dW, packed beside dX's pairs of them.
            carve("scratch.bf16_c", max(pad(n_out) // 2 * self.max_bp
                                        for name, _, n_out, _ in layers if name not in positions))

        if total > MAX_SLAB_FLOATS:
            raise CvaeError(f"its sizes with a batch of {max_batch} would need a "
                            f"{total * 4 / 1e9:.1f} GB slab, beyond the "
                            f"{MAX_SLAB_FLOATS * 4 / 1e9:.1f} GB cvae builds")
        raw = np.zeros(total + ALIGN, dtype=np.float32)
        shift = (-raw.ctypes.data % 64) // 4
        self.slab = raw[shift:shift + total]
        self.layout = offsets
        self.section_sizes = sizes
        self.params = self._tensor_views("param")
        self.grads = self._tensor_views("grad")
        self.adam_m = self._tensor_views("adam_m")
        self.adam_v = self._tensor_views("adam_v")
        return k

    def _view(self, name, shape):
        off = self.layout[name]
        n = int(np.prod(shape))
        return self.slab[off:off + n].reshape(shape)

    def _tensor_views(self, group):
        views = {}
        for name, n_in, n_out, n_bias in self._layers:
            views[f"{name}.W"] = self._view(f"{group}.{name}.W", (n_out, pad(n_in)))[:, :n_in]
            views[f"{name}.b"] = self._view(f"{group}.{name}.b", (n_bias,))
        return views

    def group_block(self, group):
        """The contiguous slab block of one group (param, grad, adam_m, adam_v), padding included."""
        names = [f"{group}.{name}.{t}" for name, *_ in self._layers for t in "Wb"]
        start = self.layout[names[0]]
        end = self.layout[names[-1]] + pad(self.section_sizes[names[-1]])
        return self.slab[start:end]

    def _feature_major(self, buffer, rows, row_slice=slice(None)):
        b = self._last_batch
        bp = pad(b)
        off = self.layout[buffer]
        full = self.slab[off:off + pad(rows) * bp].reshape(pad(rows), bp)
        return full[:rows][row_slice, :b].T

    def init_params(self, seed):
        """PyTorch's nn.Linear default: U(-1/sqrt(in), 1/sqrt(in)) for W and b; Adam reset.
        The same for Conv2d and ConvTranspose2d, whose fan_in (weight.size(1) * 16) is a
        weight's n_in here."""
        rng = np.random.default_rng(seed)
        for name, n_in, _, _ in self._layers:
            bound = 1.0 / np.sqrt(n_in)
            for t in ("W", "b"):
                view = self.params[f"{name}.{t}"]
                view[...] = rng.uniform(-bound, bound, size=view.shape)
        for group in ("grad", "adam_m", "adam_v"):
            self.group_block(group)[...] = 0.0
        self.adam_t = 0
        self.sync_bf16()

    def sync_bf16(self):
        """Refresh the bf16 weight copies from ``params``: needed after writing ``params``
        directly (init_params and load_state_sections do it); Adam keeps them current."""
        self.net.sync_bf16()

    def finite(self):
        """Whether every parameter is finite: checked before any save, so that no checkpoint
        of a diverged network is ever written."""
        return bool(np.isfinite(self.group_block("param")).all())

    def adam_update(self, lr):
        """Plain Adam from ``grads`` (the unfused path); returns nonfinite()."""
        self.adam_t += 1
        return self.net.adam_update(lr, self.adam_t)

    def nonfinite(self):
        """How many gradients or updated parameters the last Adam update (train_step's fused
        one, or adam_update) found not finite (inf or NaN): 0 while training is healthy. Free:
        the Adam loop counts as it updates."""
        return self.net.nonfinite()

    def state_sections(self, optimizer=True):
        """Named arrays (views, logical shapes) for save_checkpoint: parameters and Adam state."""
        groups = (("param", self.params), ("adam_m", self.adam_m), ("adam_v", self.adam_v))
        return {f"{group}.{name}": view for group, views in groups[:3 if optimizer else 1]
                for name, view in views.items()}

    def load_state_sections(self, sections, source="checkpoint", optimizer=True):
        """Copy checkpoint sections into the slab; missing or misshapen sections are an error.
        optimizer=False leaves Adam's state out (a model that will not train): two thirds
        of the copying, and the slab's Adam pages are never touched."""
        expected = self.state_sections(
            optimizer=optimizer and any(k.startswith("adam_") for k in sections))
        for name, view in expected.items():
            array = sections.get(name)
            if array is None or tuple(array.shape) != view.shape:
                raise CvaeError(f"{source}: section {name} is missing or has the wrong shape "
                                f"for this architecture")
            view[...] = array
        self.sync_bf16()

    def slab_report(self):
        """(section, floats) rows for `cvae info`, grouped by what they hold."""
        groups = {}
        for name, n in self.section_sizes.items():
            key = name.split(".")[0]
            groups[key] = groups.get(key, 0) + pad(n)
        return groups


class Model(SlabModel):
    """The CVAE, MLP (Arch) or convolutional (ConvArch): its slab and the kernels' Net or
    ConvNet over it.

    ``threads`` is the OpenMP thread count for every kernel call; ``max_batch`` sizes the
    activation buffers. ``precision``: fp32 or bf16 (see the module's doc).
    """

    def __init__(self, arch, max_batch=64, threads=1, precision="fp32"):
        if arch.act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.arch = arch
        self.source = "the model"  # its checkpoint's path once loaded, for error messages
        rows = _activation_rows(arch)
        if isinstance(arch, ConvArch):
            if not all(1 <= c <= MAX_CHANNELS for c in arch.channels):
                raise CvaeError(f"channels {arch.channels}: cvae builds 1 to {MAX_CHANNELS}")
            grads = ("conv1", "conv2", "enc_fc", "enc_out", "dec_in", "dec_fc1", "dec_fc2",
                     "tconv1", "tconv2")
            if max_batch > MAX_CONV_BATCH:
                raise CvaeError(f"a batch of {max_batch} is beyond the {MAX_CONV_BATCH} the "
                                f"convolutional model builds")
            # The im2col of whichever convolution's input or gradient is not kept for its dW,
            # and a convolution's weight gradient transposed ([in][out], the GEMM's output).
            col = max(rows["col1"], rows["col2"]) * pad(max_batch)
            dwt = max(pad(n_in) * pad(n_out) for name, n_in, n_out, _ in arch.layers()
                      if name in arch.positions())
            k = self._carve(arch.layers(), rows, grads, ("rec", "kl"), max_batch, threads,
                            precision, positions=arch.positions(),
                            scratch={"scratch.col": col, "scratch.dwt": dwt})
            net = k.ConvNet
        else:
            k = self._carve(arch.layers(), rows,
                            ("enc1", "enc2", "enc3", "dec_in", "dec1", "dec2", "dec3"),
                            ("rec", "kl"), max_batch, threads, precision)
            net = k.Net
        self.net = net(self.slab, self.layout, arch.layers(), arch.latent, self.max_bp,
                       arch.act, threads, precision)
        self._eval_rec = np.zeros(self.max_bp, dtype=np.float32)
        self._eval_kl = np.zeros(self.max_bp, dtype=np.float32)

    def _named_views(self, prefix):
        z = self.arch.latent
        r = _activation_rows(self.arch)
        view = self._feature_major
        if isinstance(self.arch, ConvArch):
            hidden, out, logits = ("conv1", "enc_fc", "dec_fc1", "dec_fc2", "tconv1"), \
                "enc_out", "tconv2"
        else:
            hidden, out, logits = ("enc1", "enc2", "dec1", "dec2"), "enc3", "dec3"
        views = {name: view(f"{prefix}.{name}", r[name]) for name in hidden}
        if isinstance(self.arch, ConvArch):   # without the onehot rows that follow it
            views["conv2"] = view(f"{prefix}.conv2", r["conv2"], slice(0, r["dec_fc2"]))
        views.update(mu=view(f"{prefix}.{out}", r[out], slice(0, z)),
                     logvar=view(f"{prefix}.{out}", r[out], slice(z, 2 * z)),
                     z=view(f"{prefix}.dec_in", r["dec_in"], slice(0, z)),
                     logits=view(f"{prefix}.{logits}", r[logits]))
        return views

    @property
    def acts(self):
        """Last forward's activations as (batch, features) views (post-activation); a
        convolution's features are PyTorch's flattening of (C, H, W)."""
        return self._named_views("act")

    @property
    def act_grads(self):
        """Gradients of the batch-mean loss w.r.t. pre-activations, mu, logvar, z and logits."""
        return self._named_views("actgrad")

    def forward_backward(self, pixels, labels, beta, seed, step):
        """Gradients of the batch-mean loss into ``grads``; returns (loss, rec, kl) means."""
        return self._step(pixels, labels, beta, seed, step, 0.0, 0)

    def train_step(self, pixels, labels, lr, beta, seed, step):
        """forward_backward with Adam fused into the backward pass; returns (loss, rec, kl)."""
        self.adam_t += 1
        return self._step(pixels, labels, beta, seed, step, lr, self.adam_t)

    def _step(self, pixels, labels, beta, seed, step, lr, adam_t):
        b = pixels.shape[0]
        self._last_batch = b
        rec, kl = self.net.step(pixels, labels, beta, seed, step, lr, adam_t)
        rec /= b
        kl /= b
        return rec + beta * kl, rec, kl

    def noise(self, seed, step, batch):
        out = np.empty((batch, self.arch.latent), dtype=np.float32)
        self.net.noise(seed, step, out)
        return out

    def evaluate(self, pixels, labels, seed, step, first_index=0):
        """Per-image (rec, kl), image k with eps keyed by (seed, step, first_index + k).

        Returns views that are valid until the next call."""
        b = pixels.shape[0]
        self._last_batch = b
        self.net.evaluate(pixels, labels, seed, step, first_index, self._eval_rec[:b],
                          self._eval_kl[:b])
        return self._eval_rec[:b], self._eval_kl[:b]

    def encode(self, pixels, labels):
        b = pixels.shape[0]
        mu = np.empty((b, self.arch.latent), dtype=np.float32)
        logvar = np.empty_like(mu)
        self._last_batch = b
        self.net.encode(pixels, labels, mu, logvar)
        return mu, logvar

    def decode(self, z, labels):
        """Pixel probabilities (batch, 784) for latent codes z and labels."""
        b = z.shape[0]
        probs = np.empty((b, self.arch.x_dim), dtype=np.float32)
        self._last_batch = b
        self.net.decode(np.ascontiguousarray(z, dtype=np.float32), labels, probs)
        if not np.isfinite(probs).all():
            # Finite weights can still overflow float32 (1e30 times 1e30): no trained model's do.
            raise CvaeError(f"{self.source}: decoding gives non-finite pixels (NaN): its weights "
                            f"are too large to be a trained model's")
        return probs

    def decode_bytes(self, z, labels, out):
        """decode's pixels as cvae.images.to_uint8 makes them, into out ((batch, 784) uint8,
        C-contiguous): the same bytes without a float copy, converted by the threads."""
        self._last_batch = z.shape[0]
        if self.net.decode_bytes(np.ascontiguousarray(z, dtype=np.float32), labels, out):
            raise CvaeError(f"{self.source}: decoding gives non-finite pixels (NaN): its weights "
                            f"are too large to be a trained model's")
        return out


def arch_from_json(data, source="checkpoint"):
    """Arch or ConvArch (``"type": "conv"``; no type: the MLP, as every older checkpoint) from
    a header's architecture, validated before anything is built."""
    if isinstance(data, dict) and data.get("type") == "conv":
        return _conv_arch_from_json(data, source)
    if not (isinstance(data, dict) and {"h1", "h2", "latent", "act"} <= data.keys()):
        raise CvaeError(f"{source}: no valid architecture in its header")
    sizes = [data[key] for key in ("h1", "h2", "latent")]
    # Integers only (int() would take 1.5, "64" or True), bounded before anything is built
    # (the layers' exact bounds are check_sizes', as when a model is created).
    if (not all(type(n) is int and 1 <= n <= MAX_WIDTH for n in sizes)
            or data["act"] not in ACTIVATIONS):
        raise CvaeError(f"{source}: its header's architecture {data!r:.120} is not one cvae can "
                        f"build")
    return Arch(h1=sizes[0], h2=sizes[1], latent=sizes[2], act=data["act"])


def _conv_arch_from_json(data, source):
    channels = data.get("channels")
    sizes = [data.get("hidden"), data.get("latent")]
    # As the MLP's: integers only, bounded before anything is built; channels by their own
    # bound (their buffers grow with them), the fc widths by check_sizes'.
    if (set(data) != {"type", "channels", "hidden", "latent", "act"}
            or not (isinstance(channels, list) and len(channels) == 2)
            or not all(type(c) is int and 1 <= c <= MAX_CHANNELS for c in channels)
            or not all(type(n) is int and 1 <= n <= MAX_WIDTH for n in sizes)
            or data["act"] not in ACTIVATIONS):
        raise CvaeError(f"{source}: its header's architecture {data!r:.120} is not one cvae can "
                        f"build")
    return ConvArch(channels=tuple(channels), hidden=sizes[0], latent=sizes[1], act=data["act"])


def check_digits(meta, path):
    """meta["digits"], when present: a non-empty list of distinct digits 0-9."""
    digits = meta.get("digits")
    if "digits" in meta and not (
            isinstance(digits, list) and digits and len(set(map(repr, digits))) == len(digits)
            and all(type(d) is int and 0 <= d < N_CLASSES for d in digits)):
        raise CvaeError(f"{path} is damaged: its digits {digits!r:.60} are not distinct digits "
                        f"0-{N_CLASSES - 1}")


def check_checkpoint(meta, sections, path):
    """The validation of a CVAE checkpoint (kind "cvae"), run by load_checkpoint: architecture
    within bounds and matching the sections, digits in range, Adam's step, and for a training
    checkpoint its whole position (train.Plan)."""
    arch = arch_from_json(meta.get("arch"), source=path)
    batch = header_int(meta, "batch", path, 1, MAX_BATCH, required=False)
    check_sizes(arch.layers(), batch or 1, path)
    check_state_sections(arch.layers(), sections, path)
    check_digits(meta, path)
    header_int(meta, "adam_t", path, required=False)
    if "precision" in meta and meta["precision"] not in PRECISIONS:
        raise CvaeError(f"{path} is damaged: its precision {meta['precision']!r:.40} is not one "
                        f"of {', '.join(PRECISIONS)}")


register_kind_check("cvae", check_checkpoint)


def model_from_sections(meta, sections, source, threads=1, max_batch=64, precision="fp32",
                        optimizer=True):
    """A model from a loaded checkpoint's meta and sections; Adam's state too when present,
    unless optimizer=False (for sampling and evaluation only)."""
    arch = arch_from_json(meta.get("arch", {}), source=str(source))
    try:
        model = Model(arch, max_batch=max_batch, threads=threads, precision=precision)
    except CvaeError as e:  # the slab's bound: name the file whose sizes ask for it
        raise CvaeError(f"{source}: {e}") from None
    model.load_state_sections(sections, source=str(source), optimizer=optimizer)
    model.source = str(source)
    model.adam_t = int(meta.get("adam_t", 0))
    return model


def model_from_checkpoint(path, threads=1, max_batch=64, precision="fp32"):
    """(model, meta) from a CVAE checkpoint file."""
    meta, sections, _ = load_checkpoint(path, expected_kind="cvae")
    return model_from_sections(meta, sections, path, threads, max_batch, precision), meta


# ---------------------------------------------------------------- batched encoding and decoding
# Every image set is encoded and decoded in the model's max_batch: the only Python loops are
# per batch, never per image.


def encode_all(model, pixels, labels):
    """(mu, logvar) float32 (n, latent) of uint8 pixels (n, 784) with labels (n,)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    n, latent = len(labels), model.arch.latent
    mu, logvar = np.empty((n, latent), np.float32), np.empty((n, latent), np.float32)
    for start in range(0, n, model.max_batch):
        stop = min(start + model.max_batch, n)
        mu[start:stop], logvar[start:stop] = model.encode(pixels[start:stop], labels[start:stop])
    return mu, logvar


def decode_images(model, z, labels):
    """uint8 images (n, 784) of the decoder's mean sigmoid(decoder(z, label)).

    Each batch is converted to bytes by the kernels (Model.decode_bytes), so no float image
    is kept."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    n = len(labels)
    if z.shape != (n, model.arch.latent):
        raise ValueError(f"z has shape {z.shape}, expected ({n}, {model.arch.latent})")
    out = np.empty((n, N_PIXELS), dtype=np.uint8)
    for start in range(0, n, model.max_batch):
        stop = min(start + model.max_batch, n)
        model.decode_bytes(z[start:stop], labels[start:stop], out[start:stop])
    return out
