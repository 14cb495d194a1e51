"""The jobs of ``ckaqad pack`` (stages/pack.py runs them in this order):

- plan.py       the quantization recipe (the student's, or quant's selection for plain PTQ) and the write plan: every
                output tensor's name, dtype and shape, in write order
- calibrate.py  the fake-quantized student, W4A4 input amax calibration, fallbacks for experts never routed to
- write.py      the threaded quantize-and-write into sharded safetensors, config.json and the format's extra files
- verify.py     the packed weights and logits against the fake-quantized student's
"""
