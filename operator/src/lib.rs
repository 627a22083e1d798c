//! kache-operator: reconciles CacheCluster resources (see issue: operator).
