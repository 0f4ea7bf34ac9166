"""bigbatch.train.state: the checkpoint's keys and the rules a resumed run must meet (no training needed)."""

from pathlib import Path

import pytest

from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer, state
from bigbatch.train.state import ResumingRun, check_resume, model_must_fit

RUN = ResumingRun(run_dir=Path("runs/r"), sharded=False, optimizer_name="adamw", steps=10)
SAVED = {state.WORLD_SIZE_KEY: 2, state.STEP_KEY: 4, state.OPTIMIZER_NAME_KEY: "adamw"}


def test_a_matching_checkpoint_resumes_and_the_step_bound_is_exact():
    accepted = [
        SAVED,
        {k: v for k, v in SAVED.items() if k != state.OPTIMIZER_NAME_KEY},  # older checkpoints lack the name
        {**SAVED, state.STEP_KEY: 10},  # finished at train.steps: fine, nothing left to train
    ]
    refused = []
    for saved in [*accepted, {**SAVED, state.STEP_KEY: 11}]:  # control: one step past the end
        try:
            check_resume(saved, RUN)
        except ConfigError:
            refused.append(saved[state.STEP_KEY])
    assert refused == [11]


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {state.SHARDED_KEY: Path("step-0000004")},
            r"train.parallel = 'fsdp2' and this run uses 'ddp'.*train.parallel=fsdp2",
        ),
        (
            {state.OPTIMIZER_NAME_KEY: "sgd"},
            r"optim.name = 'sgd' and this run uses 'adamw'.*--set optim.name=sgd",
        ),
        ({state.STEP_KEY: 11}, r"runs/r is already at step 11, past train.steps=10.*--steps 22"),
    ],
)
def test_each_rule_names_the_setting_to_change(change, match):
    with pytest.raises(ConfigError, match=match):
        check_resume({**SAVED, **change}, RUN)


def test_a_step_folder_is_named_by_the_parallel_it_was_written_with_and_its_twin_offered():
    folder = {**SAVED, state.SHARDED_KEY: Path("step-0000004")}
    hsdp = {**folder, state.SETTINGS_KEY: {"train": {"parallel": "hsdp"}}}
    with pytest.raises(
        ConfigError,
        match=r"train.parallel = 'hsdp' and this run uses 'ddp'; .*train.parallel=hsdp \(or fsdp2",
    ):
        check_resume(hsdp, RUN)
    with pytest.raises(ConfigError, match=r"train.parallel = 'fsdp2' .*train.parallel=fsdp2 \(or hsdp"):
        check_resume(folder, RUN)  # no settings record (an older checkpoint): named by its kind
    for parallel in ("fsdp2", "hsdp"):  # either loads the other's step folders
        check_resume(hsdp, ResumingRun(Path("runs/r"), True, "adamw", 10, parallel))


def test_a_file_checkpoint_refuses_an_fsdp2_run():
    with pytest.raises(ConfigError, match=r"train.parallel = 'ddp' and this run uses 'fsdp2'"):
        check_resume(SAVED, ResumingRun(Path("runs/r"), True, "adamw", 10))


def test_another_number_of_processes_resumes_and_a_new_rank_takes_rank_0s_random_state():
    check_resume({**SAVED, state.WORLD_SIZE_KEY: 4}, RUN)  # no rule on the world size
    saved = [{"torch": 0}, {"torch": 1}]
    assert [state.rank_rng_state(saved, r)["torch"] for r in range(3)] == [0, 1, 0]


def test_a_load_that_does_not_fit_the_model_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"in ckpts does not fit this run's model \(size mismatch for w\).*task settings"
    ):
        with model_must_fit(Path("ckpts")):
            raise RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for w")
    with pytest.raises(KeyError):  # anything else propagates unchanged
        with model_must_fit(Path("ckpts")):
            raise KeyError("x")


def test_the_constants_name_every_key_a_checkpoint_holds(tiny):
    trainer = Trainer(TrainConfig.load(overrides=[*tiny, "run.name=keys"]))
    keys = {value for name, value in vars(state).items() if name.endswith("_KEY")}
    assert set(trainer.state_dict()) == keys - {state.SHARDED_KEY}  # SHARDED_KEY is added on load only
    assert set(state.REQUIRED_KEYS) <= keys and set(state.REQUIRED_SHARDED_KEYS) <= keys
