"""Keys of the message configs that coordinator and sites both read (one definition for both ends)."""

# A train message asks the site to validate the received global adapter before training (the
# per-round federated validation, without a second message).
VALIDATE_FIRST_KEY = "validate-first"

# The fingerprint of the run's base model (common.model.base_model_id): a site whose own model
# differs refuses the round.
BASE_MODEL_ID_KEY = "base-model-id"

# Secure aggregation: the names of the round's tensors, in the order of the legacy Parameters
# list that SecAgg+ masks (both ends check them).
ARRAY_NAMES_KEY = "fedtune.array-names"
# Secure aggregation: the protocol's bound on a site's FedAvg weight, handed to the train handler
# so that a site too large refuses before it trains (and spends privacy budget).
MAX_WEIGHT_KEY = "fedtune.secure-agg-max-weight"
