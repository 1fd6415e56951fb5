"""The application wing: the `kt-sft` command (cli), the training loop, its options, data, evaluation,
plot, info, the built-in bench and the embedded default job. It imports the library; the library never
imports it."""
