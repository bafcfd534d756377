"""Reading a traced TensorFlow graph in tests: what touches a variable, what an op needs."""


def variable_ops(graph, variable):
    """``(reads, assigns)``: the ReadVariableOps and AssignVariableOps of ``graph`` on the
    tf.Variable ``variable`` (captured by the traced function)."""
    handles = {id(external): internal for external, internal in graph.captures}
    handle = handles[id(variable.handle)]
    on_it = [op for op in graph.get_operations() if any(t is handle for t in op.inputs)]
    return (
        [op for op in on_it if op.type == "ReadVariableOp"],
        [op for op in on_it if op.type == "AssignVariableOp"],
    )


def data_ancestors(op):
    """Names of the ops ``op`` depends on by data (control edges left out), itself included."""
    seen, stack = set(), [op]
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
    return seen
