"""Zero-shot tasks through lm-evaluation-harness (evaluate.py --tasks): harness task names, a local
continuation task built from held-out text, and local JSONL files, each turned into an lm-eval task YAML.
"""
import hashlib
import json
import os
from typing import Annotated

import torch
from pydantic import AfterValidator, Field, model_validator

from plumbing import artifacts, loading
from plumbing.artifacts import Bad, Count, Model
from plumbing.cli import UserError


def continuation_items(stream, tok, n_items, seed, ctx_len=64, cont_len=16, n_choices=4):
    """A LOCAL multiple-choice task from held-out text (not a standard benchmark): given 64 tokens of
    context, pick the true 16-token continuation among continuations taken from elsewhere: none overlapping the
    true one in the text, and no two choices the same string (else an item has two right answers)."""
    span = ctx_len + cont_len
    if len(stream) < span * (n_choices + 1):
        raise UserError(f"evaluation text has {len(stream)} tokens, too few for the local task; pass more --data")
    g = torch.Generator().manual_seed(seed)
    draw = lambda: int(torch.randint(0, len(stream) - span, (1,), generator=g))  # noqa: E731
    items = []
    for _ in range(n_items):
        p = draw()
        conts = [tok.decode(stream[p + ctx_len:p + span])]
        for _ in range(100 * n_choices):
            q = draw()
            text = tok.decode(stream[q + ctx_len:q + span])
            if abs(q - p) >= cont_len and text not in conts:
                conts.append(text)
            if len(conts) == n_choices:
                break
        else:
            raise UserError(f"the evaluation text is too repetitive for the local task: no {n_choices} different "
                            "continuations; pass more varied --data or drop local_continuation")
        order = torch.randperm(n_choices, generator=g).tolist()
        items.append({"context": tok.decode(stream[p:p + ctx_len]), "choices": [conts[j] for j in order],
                      "label": order.index(0)})
    return items


def unicode_text(v):
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800", but no tokenizer can encode a lone surrogate
        raise ValueError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text") from None
    return v


def non_empty(v):
    if not v:
        raise ValueError("is empty: a choice is scored as the context's continuation, so it needs text")
    return v


Unicode = Annotated[str, AfterValidator(unicode_text)]


class TaskRow(Model):
    """A local zero-shot task's line: {"context": str, "choices": [str, str, ...], "label": int index}; a choice
    is scored as a continuation, so it is never empty."""
    context: Unicode
    choices: Annotated[list[Annotated[Unicode, AfterValidator(non_empty)]], Field(min_length=2)]
    label: Count

    @model_validator(mode="after")
    def label_in_choices(self):
        if self.label >= len(self.choices):
            raise Bad(f"'label' {self.label} is not an index into its {len(self.choices)} choices")
        return self


def read_task_file(path):
    """The items of a local task, each line checked by TaskRow (blank lines skipped): {"context": str,
    "choices": [str, str, ...], "label": int index into choices}; anything else is one line naming the row."""
    if not os.path.isfile(path):
        raise UserError(f"local task file {path!r} does not exist")
    items, form = [], '{"context": str, "choices": [str, str, ...], "label": int index into choices}'
    for i, row in loading.jsonl_rows(path, form):
        try:
            items.append(TaskRow.model_validate(row).model_dump())  # the three keys, the others dropped
        except ValueError as e:  # pydantic's ValidationError is one
            raise UserError(f"{path}: line {i}: {artifacts.say(e, 'the row')}; each line must be {form}") from None
    if not items:
        raise UserError(f"local task file {path!r} has no items")
    return items


def write_items(items, folder, stem):
    """The checked items as JSONL named by their content hash: lm-eval's datasets cache keys a local file on
    its path and modification time, so a file rewritten in place would be scored from its old items."""
    text = "".join(json.dumps(it) + "\n" for it in items)
    path = os.path.join(folder, f"{stem}_{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl")
    if not os.path.isfile(path):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def task_yaml(name, path, folder):
    """An lm-eval task over a local JSONL file (dataset_path: json)."""
    text = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {os.path.abspath(path)}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\n"  # the columns, not templates:
            "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \"\"\n"  # the text is never rendered
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(text)


def prepare_tasks(names, stream, tok, run_dir, task_items=100):
    """Harness task names, 'local_continuation' (task_items built from held-out text) and 'local:PATH.jsonl'."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm-eval==0.4.13") from None
    folder = os.path.join(run_dir, "tasks")
    os.makedirs(folder, exist_ok=True)
    resolved, files = [], {}
    for name in names:
        if name == "local_continuation":
            path = write_items(continuation_items(stream, tok, task_items, 0), folder, name)
        elif name.startswith("local:"):
            source = name[len("local:"):]
            items = read_task_file(source)
            # named by the file's base name AND its contents: two files called items.jsonl stay two tasks
            name = ("local_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(source).rsplit(".", 1)[0])
                    + "_" + artifacts.file_hash(source)[:8])
            path = write_items(items, folder, name)
        else:
            resolved.append(name)
            continue
        task_yaml(name, path, folder)
        resolved.append(name)
        files[name] = path
    manager = TaskManager(include_path=folder)
    unknown = [n for n in resolved if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: see `lm_eval --tasks list`, or use "
                        "local_continuation / local:PATH.jsonl")
    # what each task's numbers depend on: a local task's items (file contents), a harness task's name
    return resolved, manager, [artifacts.file_hash(files[t]) if t in files else t for t in resolved]


def zero_shot(model, tok, tasks, manager, batch_size):
    """acc and acc_norm per task, 0-shot, through lm-eval's HFLM wrapper of the in-memory model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size),
                                  tasks=tasks, task_manager=manager, num_fewshot=0, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)["results"]
    return {t: {m: out[t][f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in out[t]} for t in tasks}
