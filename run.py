"""Command-line entry point: ``python run.py [overrides...]`` (Hydra). See README for the options."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from speech_redundancy.runner import main_from_hydra

    main_from_hydra(cfg)


if __name__ == "__main__":
    main()
