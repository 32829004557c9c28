"""The package's design directions (shared/DESIGN.md), enforced by reading every module's imports.

- the core (config, registry, inject, layer, model, io, hf_compat, mixed_batch) imports no method
  family, no trainer, comparison, server or CLI;
- a method family (a file or package under methods/) imports the core, kernels and quant, never
  another family nor train/compare/tune/serve/cli;
- train/, compare/, tune/, serve/, the CLI and inspection import no method family, and use no
  method's own config field (they ask the registry's MethodInfo instead);
- transformers' internal names live in hf_compat: no other module names them;
- kernels/ never imports quant/ (quant/ builds on kernels/).
Imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import deltatune
from deltatune.config import AdapterConfig
from deltatune.registry import available_methods, method_info

PACKAGE = Path(deltatune.__file__).parent
CORE = {"config", "registry", "inject", "layer", "model", "io", "hf_compat", "mixed_batch", "distributed"}
APPLICATIONS = {"train", "compare", "tune", "serve", "cli", "inspection"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of what an `from ... import ...` brings in (a module or its attributes)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def imports_of(path: Path) -> set[str]:
    module, tree = module_name(path), ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(resolve(module, path.name == "__init__.py", node))
    return {name for name in found if name == "deltatune" or name.startswith("deltatune.")}


def area(name: str) -> str | None:
    """core / family:<name> / application / other, for a deltatune module (or attribute) name."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if parts[1] == "methods":
        return f"family:{parts[2]}" if len(parts) > 2 else "methods"
    if parts[1] in CORE:
        return "core"
    if parts[1] in APPLICATIONS:
        return "application"
    return "other"


MODULES = sorted(PACKAGE.rglob("*.py"))
FAMILY_MODULES = {path.relative_to(PACKAGE / "methods").parts[0].removesuffix(".py")
                  for path in (PACKAGE / "methods").iterdir() if path.name != "__init__.py" and not path.name.startswith("_")
                  and (path.suffix == ".py" or path.is_dir())}


def test_the_walk_sees_the_package():
    assert {"lora", "adapters", "prompt", "ia3"} <= FAMILY_MODULES
    assert len(MODULES) > 40
    # The walk follows relative imports: lora's package imports its own combine module and the core.
    lora = imports_of(PACKAGE / "methods" / "lora" / "__init__.py")
    assert "deltatune.methods.lora.combine" in lora and "deltatune.registry" in lora


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_design_directions(path):
    here = area(module_name(path) if path.name != "__init__.py" else module_name(path) + ".__init__")
    if module_name(path) in ("deltatune", "deltatune.methods"):
        return  # the public face and the registering package import every family by design
    bad = []
    for name in sorted(imports_of(path)):
        there = area(name)
        if here == "core" and (there and there.startswith("family") or there in ("methods", "application")):
            bad.append(name)
        elif here and here.startswith("family") and (
            (there and there.startswith("family") and there != here) or there == "application"
        ):
            bad.append(name)
        elif here == "application" and there and (there.startswith("family") or there == "methods"):
            bad.append(name)
    assert not bad, f"{module_name(path)} ({here}) must not import {bad}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").rglob("*.py")), ids=lambda p: p.name)
def test_kernels_never_import_quant(path):
    """quant/ builds on kernels/; a fused kernel reaches a 4-bit layer through the interface the
    layer offers (QuantLinear.accepts / compute_chunks / project / add_input_grad_), not an import."""
    bad = sorted(name for name in imports_of(path) if name.startswith("deltatune.quant"))
    assert not bad, f"{module_name(path)} must not import {bad}"


def method_specific_fields() -> dict[str, set[str]]:
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    fields: dict[str, set[str]] = {}
    for name in available_methods():
        for field in dataclasses.fields(method_info(name).config_class):
            if field.name not in shared:
                fields.setdefault(field.name, set()).add(name)
    return fields


# Names that are also ordinary words of the applications' own (an adapters folder, a report key,
# a text task's block size).
_ALSO_GENERIC = {"adapters", "scaling", "bias", "temperature", "r", "block_size"}
# Where an application reads a name that is not a method's config field:
_NOT_A_CONFIG_FIELD = {
    # the 4-bit base storage the comparison reports (deltatune.quant's QuantLinear.quant_type)
    ("compare/measure.py", "quant_type"), ("compare/report.py", "quant_type"),
    # `deltatune inspect` reports the rank fields of peft's file format, for files of any method
    ("inspection.py", "rank_pattern"),
}


def test_applications_use_no_method_specific_config_field():
    fields = {k: v for k, v in method_specific_fields().items() if k not in _ALSO_GENERIC}
    assert {"total_step", "quant_type", "num_virtual_tokens", "lora_alpha"} <= set(fields)
    hits = []
    for path in MODULES:
        relative = str(path.relative_to(PACKAGE))
        if area(module_name(path)) != "application":
            continue
        source = path.read_text(encoding="utf-8")
        for field, methods in fields.items():
            if (relative, field) in _NOT_A_CONFIG_FIELD:
                continue
            if re.search(rf"(\.{field}\b|[\"']{field}[\"'])", source):
                hits.append(f"{relative}: {field} (of {sorted(methods)})")
    assert not hits, hits


# transformers' internal names and version-dependent spellings: hf_compat's alone.
_TRANSFORMERS_INTERNALS = [
    # (the wrapper's own checkpointing methods, defined and called on self, are its public API)
    r"[\"']Conv1D[\"']", r"past_key_values", r"(?<!def )(?<!self\.)gradient_checkpointing_enable\(",
    r"(?<!def )(?<!self\.)activation_checkpointing_enable\(", r"DynamicCache", r"modeling_llama", r"LlamaRMSNorm",
    r"SiLUActivation", r"(?<!hf_compat)\.model_type\b", r"[\"']model_type[\"']",
]


def docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def test_only_hf_compat_names_transformers_internals():
    hits = []
    for path in MODULES:
        if path.name == "hf_compat.py":
            continue
        source = path.read_text(encoding="utf-8")
        prose = docstring_lines(ast.parse(source))
        for number, line in enumerate(source.splitlines(), start=1):
            code = line.split("#", 1)[0]
            if number not in prose and any(re.search(pattern, code) for pattern in _TRANSFORMERS_INTERNALS):
                hits.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
