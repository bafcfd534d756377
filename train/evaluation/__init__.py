"""After training: multi-crop and ensemble evaluation of trained runs, SavedModel export."""
