"""medgemma_lib: the tested library behind the Traditional Chinese MedGemma QLoRA course.

The notebooks in ``notebooks/`` and the CLI (``python -m medgemma_lib``) call the same functions.
Heavy dependencies (torch, transformers) are imported lazily inside the modules that need them,
so ``import medgemma_lib`` and ``python -m medgemma_lib --help`` stay fast.
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning made every
# small CPU op up to 200x slower (measured: a 270M forward took 8 s with 2 spinning threads, 1.2 s passive).
# Must be set before torch loads its OpenMP runtime, hence here.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging as _logging


class _DropKernelsHubNotice(_logging.Filter):
    """bitsandbytes, on CPUs with AVX512-BF16 only, warns at import that it cannot fetch an optional kernel from
    the Hub (``kernels`` is not installed, and the course is offline). It changes nothing we run (4-bit layers
    never use that inference kernel: ``models.use_trainable_4bit_layout``), but it made outputs depend on the CPU."""

    def filter(self, record):
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsHubNotice())


def quiet_library_warnings() -> None:
    """Hide warnings from the libraries underneath that a learner cannot act on (notebooks 06 and 07 call this).

    transformers, PEFT, TRL and accelerate announce future API changes (``FutureWarning``) that concern their own
    next versions, not the course's code; bitsandbytes, offline on a CPU, mentions an optional ``kernels`` package.
    Only those: a warning of any other kind or from any other package still shows.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl|accelerate)(\.|$)")


__version__ = "0.1.0"

MEDICAL_DISCLAIMER = (
    "⚠️ 醫療免責聲明：以下內容由語言模型自動產生，僅供教學與研究用途，"
    "不構成醫療建議、診斷或治療。身體不適請諮詢合格醫療人員；緊急狀況請撥打 119。"
)
