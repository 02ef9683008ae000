"""O_DIRECT where it pays (drtool.storage.direct)."""



def test_probes_of_one_directory_from_many_threads_do_not_trip_over_each_other(tmp_path):
    """A group transaction probes its members' image directories side by side (one server
    process): every probe answers, and none leaves a file behind."""
    import threading

    from drtool.storage.direct import direct_io_pays

    expected = direct_io_pays(str(tmp_path))
    answers, errors = [], []

    def probe() -> None:
        try:
            for _ in range(200):
                answers.append(direct_io_pays(str(tmp_path)))
        except Exception as exc:  # noqa: BLE001 - the race raised FileNotFoundError
            errors.append(exc)

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and answers == [expected] * 800
    assert list(tmp_path.iterdir()) == []
