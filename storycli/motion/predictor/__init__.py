"""The Semantic Motion Predictor: the model, its training run and its data set of embeddings."""
