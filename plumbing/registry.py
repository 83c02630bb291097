"""The registry of allocation methods: every file in methods/ registers its method here on import, and
learn_masks.py looks a --method up by name, adds each method's own flags and runs its flag checks."""

GATES = {}  # learned: name -> Gate subclass
ALLOCATORS = {}  # train nothing: name -> (allocate function, whether it needs the model and calibration ids)
FLAGS = {}  # name -> ({"--flag": the keywords of argparse's add_argument}, check_args(args) or None)


def register(name, cls):
    """The one call that adds a learned method: learn_masks.py --method NAME trains `cls` (a Gate subclass)."""
    from methods.base import Gate  # here, not at the top: methods/base.py reads GATES from this file
    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise TypeError(f"{cls!r} is not a methods.base.Gate subclass")
    GATES[name] = cls
    FLAGS[name] = (cls.flags, cls.check_args)


def register_allocator(name, fn, needs_model=False, flags=None, check_args=None):
    """Add a method that trains nothing: learn_masks.py --method NAME calls fn(shapes, rho, ctx, args)."""
    ALLOCATORS[name] = (fn, needs_model)
    FLAGS[name] = (flags or {}, check_args)


def names():
    """Every --method: the allocations that train nothing, then the learned ones."""
    return [*ALLOCATORS, *GATES]


def add_flags(parser):
    """Every registered method's own flags, in registration order. A flag several methods declare (a subclass
    inherits its parent's) is added once, and only if they declare it alike: two meanings of one flag fail loudly."""
    added = {}
    for flags, _ in FLAGS.values():
        for flag, keywords in flags.items():
            if flag not in added:
                parser.add_argument(flag, **keywords)
            elif added[flag] != keywords:
                raise TypeError(f"{flag} is declared by two methods with different keywords: rename one")
            added[flag] = keywords


def check_args(args):
    """The chosen method's own flag checks (one line, UserError)."""
    check = FLAGS[args.method][1]
    if check is not None:
        check(args)
