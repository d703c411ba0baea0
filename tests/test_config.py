"""params.yaml against its typed sections: every section has one, the shipped file validates, and the file and the
code agree on every default (so deleting a key from the file never changes what a stage does)."""

import pytest

from core.config import Section, load_section, read_params
from core.errors import UserError
from generation.studio.app import StudioParams
from models.carrying import EvaluateCarryingParams
from models.coconet_eval import EvaluateCoconetParams, SamplingParams
from models.coconet_train import TrainCoconetParams
from models.evaluate_steering import EvaluateSteeringParams
from models.generation_params import GenerateParams, GeneratorParams
from models.probe_params import ProbesParams
from models.train import FitCodecParams, TrainGeneratorParams
from pipelines.corpus import CorpusParams
from pipelines.dataset import BuildDatasetParams, DataParams
from pipelines.scores import BuildScoresParams
from registry.store import RegistryParams

SECTIONS: dict[str, type[Section]] = {
    "data": DataParams,
    "corpus": CorpusParams,
    "build_dataset": BuildDatasetParams,
    "fit_codec": FitCodecParams,
    "train_generator": TrainGeneratorParams,
    "evaluate_carrying": EvaluateCarryingParams,
    "generator": GeneratorParams,
    "probes": ProbesParams,
    "evaluate_steering": EvaluateSteeringParams,
    "registry": RegistryParams,
    "generate": GenerateParams,
    "build_scores": BuildScoresParams,
    "train_coconet": TrainCoconetParams,
    "evaluate_coconet": EvaluateCoconetParams,
    "coconet_sampling": SamplingParams,
    "studio": StudioParams,
}
# Where a field's default deliberately differs from the shipped file: the file names this project's artifacts to
# register; a params file without them registers nothing rather than guessing paths.
FILE_ONLY = {"registry": {"register_"}}


def test_every_section_of_params_yaml_has_a_typed_model():
    params = read_params("params.yaml")
    assert set(params) - {"seed"} == set(SECTIONS)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_the_shipped_section_validates_and_agrees_with_the_code_defaults(name):
    cls = SECTIONS[name]
    loaded = load_section(cls, "params.yaml", name)
    defaults = cls.model_validate({"seed": loaded.seed} if "seed" in cls.model_fields else {})
    skip = FILE_ONLY.get(name, set())
    differ = {
        k: (getattr(defaults, k), getattr(loaded, k))
        for k in cls.model_fields
        if k not in skip and getattr(defaults, k) != getattr(loaded, k)
    }
    assert not differ, f"params.yaml {name} and the code's defaults disagree (default, file): {differ}"


def test_a_misspelt_key_is_one_line_naming_it(tmp_path):
    text = open("params.yaml").read().replace("\n  ema_decay: 0.999 ", "\n  ema_decai: 0.999 ", 1)
    assert "\n  ema_decai: 0.999 " in text
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        load_section(TrainCoconetParams, tmp_path / "p.yaml", "train_coconet")
    assert "train_coconet.ema_decai" in str(e.value) and "\n" not in str(e.value)
