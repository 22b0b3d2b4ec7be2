"""Named methods: presets of drafter x length policy x acceptance rule, and the peers we measure against.

The registry (registry.py) holds every method: its options dataclass and its build. One module per family registers
its methods: sd.py (ar, sd, and the build every method of our decoding loop shares), cmasd.py (specdec and the CM-ASD
methods), specbound.py, rstitch.py (rstitch, rstitch+) and peers.py (hf, hf-assisted, hf-lookup, llamacpp). Shared
option groups: placement.py (backend, format), drafting.py (drafter, ngram; the drafters they name), options.py (how
options are declared and read). Runners: runners.py.
"""

# isort: off
# each family registers its methods, in the order the CLI lists them: ours, then the peers
from adaspec.methods import sd, cmasd, specbound, rstitch, peers  # noqa: F401
# isort: on
from adaspec.methods.drafting import (
    DrafterChoice,
    DrafterOption,
    Drafting,
    default_drafter,
    has_standalone,
    load_drafter,
    make_drafter,
)
from adaspec.methods.options import Options, ServerSide, option
from adaspec.methods.placement import (
    Placement,
    WeightFormat,
    backend_choice,
    resolve_backend,
    target_backend,
    target_gguf,
)
from adaspec.methods.registry import (
    BuildContext,
    Method,
    MethodSpec,
    build_runner,
    get,
    methods,
    names,
    parse_method,
    register,
    split_specs,
    unregister,
)
from adaspec.methods.rstitch import make_router, small_model
from adaspec.methods.runners import EngineRunner, HFRunner, LlamaCppRunner, Runner, stop_criteria
from adaspec.methods.sd import Parts, build_engine

__all__ = [
    "BuildContext", "DrafterChoice", "DrafterOption", "Drafting", "EngineRunner", "HFRunner", "LlamaCppRunner",
    "Method", "MethodSpec", "Options", "Parts", "Placement", "Runner", "ServerSide", "WeightFormat", "backend_choice",
    "build_engine", "build_runner", "default_drafter", "get", "has_standalone", "load_drafter", "make_drafter",
    "make_router", "methods", "names", "option", "parse_method", "register", "resolve_backend", "small_model",
    "split_specs", "stop_criteria", "target_backend", "target_gguf", "unregister",
]
