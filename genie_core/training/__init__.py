"""Training: the Accelerate engine every stage trains with (`engine`) and the staged `genie run` (`pipeline`)."""
