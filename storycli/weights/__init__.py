"""Where weights come from, for every stage: devices and dtypes, the Hugging Face cache and hub,
image encoders, and the tiny random models the tests build offline."""
