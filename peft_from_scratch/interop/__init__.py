"""Interop with the reference libraries: the only place that knows their names, formats and configs.

* ``peft``: peft's configs, tensor names and files for LoRA, DoRA, prompt tuning, P-tuning and
  prefix tuning; ``twin`` builds ours and peft's side by side; ``shira_twin`` for RoSA with r = 0.
* ``adapterhub``: AdapterHub's ``adapters`` for the bottleneck adapters, in a side environment
  (it pins transformers 4.57) driven through ``scripts/adapterhub_worker.py``.

Methods never import this package; it imports them.
"""
