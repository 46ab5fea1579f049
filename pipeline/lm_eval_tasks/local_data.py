"""The dataset of the shipped synthetic tasks: a JSONL beside this file, read without the Hugging Face hub.

A task YAML's `dataset_kwargs: {data_files: ...}` resolves against the folder `isoflop eval` runs in; these
tasks load their file through `custom_dataset` instead, so they work from anywhere.
"""
from pathlib import Path


def synthetic(**_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("synthetic.jsonl"))})
