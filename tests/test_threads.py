"""map_in_threads: order kept, one state per thread, the first made before any thread runs."""

import threading

from featgender.threads import map_in_threads


def test_results_keep_order_each_thread_has_its_own_state_and_the_first_is_made_by_the_caller():
    made_by = []

    def state() -> object:
        made_by.append(threading.current_thread())
        return object()

    def work(own: object, item: int) -> tuple[object, threading.Thread, int]:
        return own, threading.current_thread(), item * 2

    results = list(map_in_threads(work, range(200), state, threads=2, ahead=8))
    assert [doubled for _, _, doubled in results] == list(range(0, 400, 2))
    assert made_by[0] is threading.current_thread()  # dlib loads here, never beside another thread's decode
    states_of = {}
    for own, thread, _ in results:
        states_of.setdefault(thread, set()).add(id(own))
    assert all(len(ids) == 1 for ids in states_of.values())  # a thread keeps its state
    assert len(set().union(*states_of.values())) == len(states_of) == len(made_by)  # none shared, none wasted
    assert threading.current_thread() not in states_of
