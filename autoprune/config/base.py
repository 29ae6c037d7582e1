"""What every config model shares: strict keys, and the marks that say how a key affects resuming.

A study refuses to resume when a setting that changes how trials are scored differs from the one
it was made with (``autoprune.study.study.search_hash``). Which keys those are is a property of
the key, so it is written on the field, next to its type and default, and the study derives its
lists from the schema (:func:`resume_keys`, :func:`added_defaults`); a new key cannot be
forgotten in a list kept elsewhere. Unmarked keys are scoring keys: changing one refuses a resume.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

#: How a change to a key affects resuming a study (the ``resume`` entry of a field's
#: ``json_schema_extra``; unmarked keys refuse a resume when changed):
#:
#: * ``free`` — does not change how a finished trial is scored (where the run folder is, how long
#:   to search, which trials the sampler proposes next): hashed as null, so a study resumes
#:   across changes to it;
#: * ``runtime`` — machine and logging settings that may differ between the workers of one study
#:   (a GPU box and a CPU box): left out of the hash altogether, not even as null.
ResumeMark = Literal["free", "runtime"]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored), and so are bad assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resume(mark: ResumeMark) -> dict[str, Any]:
    """``json_schema_extra`` of a field whose changes do not refuse a resume (see :data:`ResumeMark`).
    It also appears in the JSON schema, so the reference docs can say so."""
    if mark not in get_args(ResumeMark):
        raise ValueError(f"unknown resume mark {mark!r}; one of {get_args(ResumeMark)}")
    return {"resume": mark}


def added(default: Any) -> dict[str, Any]:
    """``json_schema_extra`` of a key added after studies were first stored: at ``default`` (the
    value that scores trials as before the key existed) it is left out of the hash, so studies
    made before it still resume. The value is written here, not taken from the field's default,
    so changing a default later cannot silently change the hash of existing studies."""
    return {"added_default": default}


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields of ``model`` that are sections (a nested model, not a list of them)."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = ann
    return out


def _extra(field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def resume_keys(model: type[BaseModel], mark: ResumeMark, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of ``model`` (``search.trials``) marked ``resume: mark``; a marked section
    counts as one key (``train``), an unmarked one is searched for marked keys."""
    keys: list[str] = []
    sections = _sections(model)
    for name, field in model.model_fields.items():
        if _extra(field).get("resume") == mark:
            keys.append(prefix + name)
        elif name in sections and "resume" not in _extra(field):
            keys.extend(resume_keys(sections[name], mark, f"{prefix}{name}."))
    return tuple(keys)


def added_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key → the value it is left out of the hash at, for every key marked with :func:`added`."""
    out: dict[str, Any] = {}
    sections = _sections(model)
    for name, field in model.model_fields.items():
        extra = _extra(field)
        if "added_default" in extra:
            out[prefix + name] = extra["added_default"]
        elif name in sections and "resume" not in extra:
            out.update(added_defaults(sections[name], f"{prefix}{name}."))
    return out


__all__ = ["ResumeMark", "StrictModel", "added", "added_defaults", "resume", "resume_keys"]
