"""Order-safe steps: every order of the decision steps is either refused with a message naming the steps, or
writes a correct model. Correct: every layer's integers sit on its final grid (AdaRound's rounding within twice
nearest rounding's weight error there) and the exported model runs in onnxruntime close to FP32."""
import itertools

import numpy as np
import pytest
from builders import conv_bn_relu, run, save_npy_samples

from ptq.data import DataSource, model_inputs
from ptq.errors import InputError
from ptq.export import export_qdq
from ptq.model import Graph
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import dequantize, quantize

STEPS = ["weight_ranges", "activation_ranges", "easyquant", "adaround", "bias_correction", "bias_overflow"]


def test_every_order_is_refused_with_a_reason_or_accepted():
    accepted, reasons = [], set()
    for order in itertools.permutations(STEPS):
        try:
            Config(steps=list(order), easyquant=True, adaround=True, bias_correction="empirical").validate()
            accepted.append(order)
        except InputError as e:
            assert str(e).startswith("steps: ") and any(s in str(e) for s in STEPS), str(e)
            reasons.add(str(e).split(":")[1].split()[0])
    # weight and activation ranges (either first) → EasyQuant → AdaRound and bias correction (either) → the guard
    assert len(accepted) == 4 and all(o[2] == "easyquant" and o[-1] == "bias_overflow" for o in accepted)
    assert reasons == {"adaround", "bias_correction", "bias_overflow", "easyquant"}, reasons
    with pytest.raises(InputError, match="easyquant rewrites the weight grids that adaround already used"):
        Config(steps=["weight_ranges", "activation_ranges", "adaround", "easyquant"], easyquant=True).validate()
    with pytest.raises(InputError, match="listed twice"):
        Config(steps=["weight_ranges", "weight_ranges"]).validate()
    with pytest.raises(InputError, match="adaround reads the activation grids"):  # x̃ with the activations' grids
        Config(steps=["weight_ranges", "adaround", "activation_ranges"], adaround_inputs="quantized_acts").validate()


@pytest.mark.slow
def test_every_accepted_order_writes_a_correct_model(rng, tmp_path):
    model = conv_bn_relu(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 16)
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))[:4]])
    want = run(model, {"x": x})[0]
    for order in itertools.permutations(STEPS):
        cfg = Config(steps=list(order), easyquant=True, adaround=True, bias_correction="empirical", holdout=0,
                     batch_size=8, adaround_iters=20, easyquant_steps=8, easyquant_passes=1)
        try:
            cfg.validate()
        except InputError:
            continue
        state = run_steps(prepare(model, cfg), Context(DataSource(calib, model_inputs(model))), {})
        gr = Graph(state.model)
        for layer in state.layers:
            w, enc = gr.const(layer.weight), state.weights[layer.name]
            q = state.rounded.get(layer.name)
            if q is None:
                continue
            assert np.all((q >= enc.spec.qmin) & (q <= enc.spec.qmax)), order
            err = np.abs(dequantize(q, enc) - w).mean()
            nearest = np.abs(dequantize(quantize(w, enc), enc) - w).mean()
            assert err <= 2 * nearest + 1e-9, (order, layer.name, err, nearest)
        got = run(export_qdq(state), {"x": x})[0]
        cos = float(got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.98, (order, cos)
