"""User-facing error types.

Every error a user can cause is raised as a subclass of :class:`MedgemmaError` whose message is
Traditional Chinese and says what happened, where, and how to fix it. The CLI prints the message
(no traceback unless ``--debug``) and exits with :data:`EXIT_USER_ERROR`.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class MedgemmaError(Exception):
    """Base class: an error the user can fix. ``str(err)`` is the Chinese message."""

    exit_code = EXIT_USER_ERROR
    label = "錯誤"  # the CLI prints "<label>：<message>"

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        if self.hint:
            return f"{self.message}\n解決方法：{self.hint}"
        return self.message


class ConfigError(MedgemmaError):
    """A run configuration (YAML file or command-line override) is invalid."""


class DataError(MedgemmaError):
    """An input data file cannot be read, parsed or validated."""


class ModelError(MedgemmaError):
    """A model profile, folder or checkpoint cannot be resolved or loaded."""


class AuthError(MedgemmaError):
    """Hugging Face authentication or gated-access problem."""


class ResourceError(MedgemmaError):
    """Not enough memory, disk, or a missing hardware capability."""


class TrainingError(MedgemmaError):
    """Training could not start or failed in a way the user can act on."""


class OutputError(MedgemmaError):
    """An output folder cannot be created or written."""


class TrainingInterrupted(MedgemmaError):
    """Training stopped cleanly after Ctrl+C (SIGINT): a complete checkpoint is on disk. CLI exit code 130.

    ``checkpoint_shown`` and ``config_shown`` are the paths as the learner should read them
    (``paths.display_path``; this module imports nothing of the project's, so the caller formats them).
    """

    exit_code = 130
    label = "已停止"

    def __init__(self, step: int, checkpoint, run_dir, *, checkpoint_shown: str | None, config_shown: str):
        self.step, self.checkpoint, self.run_dir = step, checkpoint, run_dir
        where = f"完整的檢查點在 {checkpoint_shown}" if checkpoint_shown else "但沒有找到完整的檢查點"
        super().__init__(
            f"訓練已在第 {step} 步安全停止（Ctrl+C），{where}。\n"
            f"接續訓練：python -m medgemma_lib train --config {config_shown} --resume"
            "（notebook 中：run_training(cfg, resume=True)）。"
        )


def raised_by(call, *args, **kwargs) -> MedgemmaError | None:
    """The :class:`MedgemmaError` that ``call(*args, **kwargs)`` raises, or None when it returns normally.

    For a lesson that shows what a user's mistake looks like (notebook 03: a wrong encoding): the cell prints
    ``err.format()`` (what, where, how to fix) instead of a traceback. Any other exception propagates.
    """
    try:
        call(*args, **kwargs)
    except MedgemmaError as err:
        return err
    return None
