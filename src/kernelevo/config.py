"""KernelConfig: a kernel family with every parameter fixed — what the DSL selects, the
tuner measures and the extension runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .chips import Chip
from .families import Family, ParamValue, family


class ConfigError(ValueError):
    """A configuration that its family does not accept."""


@dataclass(frozen=True)
class KernelConfig:
    op: str
    backend: str
    family: str
    params: tuple[tuple[str, ParamValue], ...]  # in the family's parameter order

    @classmethod
    def make(cls, op: str, backend: str, family_name: str,
             params: Mapping[str, ParamValue]) -> KernelConfig:
        """Checks names and domains (not constraints: see `check`) and orders the params."""
        fam = family(op, backend, family_name)
        if fam is None:
            raise ConfigError(f"no {op} family {family_name!r} on the {backend} backend")
        unknown = sorted(set(params) - set(fam.param_names))
        if unknown:
            raise ConfigError(f"{family_name} has no parameter {', '.join(unknown)}; "
                              f"it takes {', '.join(fam.param_names)}")
        missing = [n for n in fam.param_names if n not in params]
        if missing:
            raise ConfigError(f"{family_name} needs {', '.join(missing)}")
        # flags in the extension's form (0/1, as config_of reports them) are booleans
        params = {k: bool(v) if fam.param(k).kind == "bool" and v in (0, 1) else v
                  for k, v in params.items()}
        for p in fam.params:
            if not p.contains(params[p.name]):
                raise ConfigError(f"{family_name}: {p.name}={_text(params[p.name])} is not "
                                  f"{p.domain_text()}")
        return cls(op, backend, family_name, tuple((n, params[n]) for n in fam.param_names))

    @classmethod
    def parse(cls, text: str, op: str, backend: str) -> KernelConfig:
        """From the DSL's form: `gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m`."""
        from .dsl import parse_config

        family_name, params = parse_config(text)
        return cls.make(op, backend, family_name, params)

    @property
    def schema(self) -> Family:
        fam = family(self.op, self.backend, self.family)
        assert fam is not None
        return fam

    def get(self, name: str) -> ParamValue:
        return dict(self.params)[name]

    def as_dict(self) -> dict[str, ParamValue]:
        return dict(self.params)

    @property
    def name(self) -> str:
        """Carries every parameter, so it can key a cache: gemm_mc96_nc1024_..._splitm."""
        return "_".join([self.family] + [f"{k}{_name_text(v)}" for k, v in self.params])

    def to_dsl(self) -> str:
        return " ".join([self.family] + [f"{k}={_text(v)}" for k, v in self.params])

    def check(self, chip: Chip, call: Mapping | None = None) -> None:
        """Raises ConfigError if a constraint fails for this chip (and call, if given)."""
        broken = self.schema.violations(self.as_dict(), chip, call)
        if broken:
            raise ConfigError(f"{self.to_dsl()}: " + "; ".join(broken))

    def ext_params(self) -> dict[str, int | str]:
        """The parameters as the extension takes them (flags as 0/1)."""
        return {k: int(v) if isinstance(v, bool) else v for k, v in self.params}

    def __str__(self) -> str:
        return self.to_dsl()


def _text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _name_text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
