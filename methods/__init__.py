"""The papers' methods, one file each. Each registers itself with methods.register (a Gate) or
methods.register_allocator (a function) when learn_masks.py imports it; this file imports none of them, so a
stage that needs only the budget arithmetic (methods/base.py) loads no method.

  base.py          the budget (§2), the masked layer, the Gate interface and the registry, guidance,
                   ARA's finalisation, the export
  closed_form.py   uniform (SVD-LLM), energy, svdllm2 (SVD-LLM V2)      train nothing      §2, §3.6
  strs.py          ASVD's sensitivity search                           train nothing      §3.5
  sigmoid.py       LLRC's Gumbel-sigmoid mask                           learned            §3.1
  hardconcrete.py  Louizos' hard-concrete L0 gates                      learned            §3.2
  ara.py           ARA's simplex mask                                   learned            §3.3
  soco.py          SoCo's learned spectrum                              learned            §3.4
"""
from methods.base import ALLOCATORS, GATES, names, register, register_allocator  # noqa: F401
