"""Small helpers: instantiation, config printing, logging, atomic writes, safe checkpoint IO."""
