"""The papers' methods, one file each; every file registers its method on import (plumbing/registry.py).

  closed_form.py   uniform (SVD-LLM), energy, svdllm2 (SVD-LLM V2)      train nothing      §2, §3.6
  strs.py          ASVD's sensitivity search                           train nothing      §3.5
  sigmoid.py       LLRC's Gumbel-sigmoid mask                           learned            §3.1
  hardconcrete.py  Louizos' hard-concrete L0 gates                      learned            §3.2
  ara.py           ARA's simplex mask                                   learned            §3.3
  soco.py          SoCo's learned spectrum                              learned            §3.4
  base.py          what they share: the budget, the masked layer, the Gate interface, the
                   budget and guidance terms of the loss, ARA's finalisation, the export
"""
from plumbing.registry import ALLOCATORS, GATES, add_flags, check_args, names, register, register_allocator  # noqa: F401
from methods import closed_form, strs, sigmoid, hardconcrete, ara, soco  # noqa: E402,F401  (each registers itself)
