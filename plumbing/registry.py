"""The registry of allocation methods: every file in methods/ registers its method here on import, and
learn_masks.py looks a --method up by name, adds each method's own flags and runs its flag checks."""

GATES = {}  # learned: name -> Gate subclass
ALLOCATORS = {}  # train nothing: name -> (allocate function, whether it needs the model and calibration ids)
FLAG_HOOKS = {}  # name -> (add_flags(parser) or None, check_args(args) or None)


def register(name, cls):
    """The one call that adds a learned method: learn_masks.py --method NAME trains `cls` (a Gate subclass)."""
    from methods.base import Gate  # here, not at the top: methods/base.py reads GATES from this file
    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise TypeError(f"{cls!r} is not a methods.base.Gate subclass")
    GATES[name] = cls
    FLAG_HOOKS[name] = (cls.add_flags, cls.check_args)


def register_allocator(name, fn, needs_model=False, add_flags=None, check_args=None):
    """Add a method that trains nothing: learn_masks.py --method NAME calls fn(shapes, rho, ctx, args)."""
    ALLOCATORS[name] = (fn, needs_model)
    FLAG_HOOKS[name] = (add_flags, check_args)


def names():
    """Every --method: the allocations that train nothing, then the learned ones."""
    return [*ALLOCATORS, *GATES]


def add_flags(parser):
    """Every registered method's own flags (a hook shared by several methods is added once)."""
    for hook in dict.fromkeys(add for add, _ in FLAG_HOOKS.values() if add is not None):
        hook(parser)


def check_args(args):
    """The chosen method's own flag checks (one line, UserError)."""
    check = FLAG_HOOKS[args.method][1]
    if check is not None:
        check(args)
