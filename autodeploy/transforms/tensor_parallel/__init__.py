"""The parts of the shard_tensor_parallel transform (autodeploy/transforms/shard_tensor_parallel.py):
finding regions, solving which indices a rank owns, rewriting a solved region."""
